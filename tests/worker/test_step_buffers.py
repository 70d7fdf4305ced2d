"""The step buffers copy the query starts and the block tables only when (and from where) they changed."""

from __future__ import annotations

import torch

from pagedllm.worker.step_buffers import StepBuffers


def buffers_with_device_twins() -> StepBuffers:
    """CPU buffers whose "device" tensors are separate copies, as on CUDA, so what is copied can be seen."""
    buffers = StepBuffers(max_num_tokens=16, max_num_reqs=4, max_blocks_per_req=3, device=torch.device("cpu"))
    for staged in (buffers.block_tables, buffers.query_start_loc):
        staged.device = torch.full_like(staged.host, -7)
    return buffers


def test_block_table_rows_are_copied_from_the_first_row_written_since_the_last_copy() -> None:
    buffers = buffers_with_device_twins()
    buffers.write_block_table_row(0, 1, [5])
    buffers.write_block_table_row(1, 2, [6, 7])
    assert buffers.upload_block_tables(3).tolist() == [[5, 0, 0], [6, 7, 0], [0, 0, 0]]
    buffers.block_tables.device[:] = -1  # a copy from now on would overwrite these
    assert buffers.upload_block_tables(2).tolist() == [[-1] * 3] * 2  # nothing written: nothing copied
    buffers.write_block_table_row(1, 2, [6, 7, 8])  # the same table grew: row 1 changes
    assert buffers.upload_block_tables(2).tolist() == [[-1] * 3, [6, 7, 8]]
    buffers.write_block_table_row(0, 1, [5])  # unchanged: no write, no copy
    # Rows past those copied last time count as changed (conservative): rows 2 and 3 are copied.
    assert buffers.upload_block_tables(4).tolist() == [[-1] * 3, [6, 7, 8], [0, 0, 0], [0, 0, 0]]
    buffers.write_block_table_row(0, 3, [9])  # another request takes row 0
    assert buffers.upload_block_tables(1).tolist() == [[9, 0, 0]]
    assert buffers.block_tables.device[1].tolist() == [6, 7, 8]


def test_query_starts_are_copied_only_when_they_differ_from_the_device() -> None:
    buffers = buffers_with_device_twins()
    qsl = buffers.query_start_loc
    qsl.np[:3] = [0, 1, 2]
    assert qsl.upload(3).tolist() == [0, 1, 2]
    qsl.device[:] = -1
    assert qsl.upload(3).tolist() == [-1, -1, -1]  # same values: not copied
    assert qsl.upload(2).tolist() == [-1, -1]
    qsl.np[3] = 3
    assert qsl.upload(4).tolist() == [0, 1, 2, 3]  # more rows than the device holds: copied
    qsl.np[1] = 5
    assert qsl.upload(2).tolist() == [0, 5]
