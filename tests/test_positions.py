"""Block-aware positions computed on the device (``worker/positions.BlockPositions``), on CPU tensors.

Over random steps (requests admitted, finished and moved between batch rows; prefill chunks, one-token
chunks, decode; ordinary requests and padding rows beside block requests), the in-place edit of vLLM's
slot-index positions must equal ``PagedLayout.positions`` (the reference the host path used), touch no
ordinary token and nothing past the step's tokens, rewrite a row only when its occupant changes, and never
read a device tensor on the host. The engine tests (test_plugin, test_equivalence) check the same positions
end to end against the reference model.
"""

import numpy as np
import pytest
import torch

from tests.test_cuda_meta import PAGE, NoHostRead, _args, _steps
from tools.cuda_cases import Row, _row_layout
from vllm_blockattn.worker.positions import BlockPositions


def _expected(rows, total: int, sentinel: int) -> torch.Tensor:
    want = []
    for layout, seq, n in rows:
        slots = np.arange(seq - n, seq)
        want.append(slots if layout is None else layout.positions(slots))
    out = torch.full((total,), sentinel, dtype=torch.int64)
    flat = np.concatenate(want) if want else np.zeros(0, np.int64)
    out[:len(flat)] = torch.from_numpy(flat.astype(np.int64))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_device_positions_equal_the_layout_positions(seed):
    pos = BlockPositions(PAGE, "cpu", max_rows=2)        # grows (rows and pages) on the way
    for rows in _steps(seed, n_steps=40):
        layouts, qsl, seq_lens, num_tokens = _args(rows)
        total = num_tokens + 5                            # vLLM's buffer is longer than the step
        positions = torch.full((total,), -7, dtype=torch.int64)
        start = 0
        for _, seq, n in rows:                            # what vLLM leaves there: slot indices
            positions[start:start + n] = torch.arange(seq - n, seq)
            start += n
        pos.apply(positions.as_subclass(NoHostRead), qsl.as_subclass(NoHostRead), layouts, num_tokens)
        torch.testing.assert_close(positions, _expected(rows, total, -7), rtol=0, atol=0)


def test_rows_rewritten_only_when_their_occupant_changes():
    a = _row_layout(Row((17, 12, 1), 3, cached=(2,)), PAGE)[1]
    b = _row_layout(Row((50,), 6), PAGE)[1]
    pos = BlockPositions(PAGE, "cpu", max_rows=4)

    def step(layouts):
        before = pos.rows.row_writes
        qsl = torch.arange(len(layouts) + 1, dtype=torch.int32)   # one decode token per row
        pos.apply(torch.full((len(layouts),), 200, dtype=torch.int64), qsl, layouts, len(layouts))
        return pos.rows.row_writes - before

    assert step([a, None, b]) == 3
    assert step([a, None, b]) == 0
    assert step([b, None, a]) == 2                       # moved between rows: both rewritten
    assert step([b, a]) == 1                             # a moved up (condense); row 2 is past the batch


def test_a_layout_off_the_page_size_is_refused():
    layout = _row_layout(Row((17, 12), 3), PAGE)[1]
    pos = BlockPositions(PAGE * 2 + 1, "cpu")
    with pytest.raises(ValueError, match="KV cache block size"):
        pos.apply(torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1]), [layout], 1)
