"""Put and get over real loopback gRPC: tensors, tables, files and blobs, each way intact."""

from __future__ import annotations

import blake3

import numpy as np
import pyarrow as pa
import pytest

from planes.data.v1 import data_service_pb2 as pb
from planes.kernel.contracts import DataPlane
from planes.plugins.data.client import DataClient

from .conftest import fields

MiB = 1 << 20


@pytest.mark.parametrize("classification", ["public", "confidential"])
def test_tensor_round_trip_with_metadata_and_evidence(serve, classification):
    array = np.arange(3 * MiB // 4, dtype=np.float32).reshape(768, 1024)

    async def scenario(served):
        data = served.data()
        info = await data.put_tensor(array, classification=classification, chunk_bytes=256 * 1024)
        back = await data.get_tensor(info.ref.payload_id, verify=True)
        stat = await data.stat(info.ref.payload_id)
        return info, back, stat, await served.events()

    info, back, stat, events = serve(scenario)
    assert np.array_equal(back, array) and back.dtype == np.float32 and back.shape == (768, 1024)
    assert info.ref.size == array.nbytes and info.ref.digest.value == blake3.blake3(array.tobytes()).digest()
    assert info.ref.tenant == "acme" and info.state == pb.PAYLOAD_STATE_AVAILABLE
    assert info.encrypted_at_rest == (classification == "confidential")
    assert info.chunk_count == 12 and stat.ref.payload_id == info.ref.payload_id
    assert info.correlation.correlation_id, "a put without correlation gets the call's"
    stored = [e for e in events if e.event_type == "data.stored"]
    assert len(stored) == 1 and fields(stored[0])["digest"] == info.ref.digest.value.hex()


def test_table_file_blob_and_strided_tensor(serve, tmp_path):
    table = pa.table({"id": pa.array(range(10_000), pa.int64()), "name": [f"row-{i}" for i in range(10_000)]})
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 5000)
    strided = np.arange(64, dtype=np.int16).reshape(8, 8)[:, ::2]  # not contiguous: copied once before sending

    async def scenario(served):
        data = served.data()
        table_info = await data.put_table(table, classification="internal")
        file_info = await data.put_file(source, classification="internal", chunk_bytes=100_000)
        blob_info = await data.put(b"", classification="public")
        tensor_info = await data.put_tensor(pa.Tensor.from_numpy(strided), classification="public")
        target = tmp_path / "out" / "copy.bin"
        target.parent.mkdir()
        await data.get_file(file_info.ref.payload_id, target)
        return (await data.get_table(table_info.ref.payload_id), target.read_bytes(), file_info,
                await data.get_bytes(blob_info.ref.payload_id),
                await data.get_arrow_tensor(tensor_info.ref.payload_id))

    got_table, got_file, file_info, blob, tensor = serve(scenario)
    assert got_table.equals(table)
    assert got_file == source.read_bytes() and file_info.name == "weights.bin"
    assert file_info.kind == pb.CONTENT_KIND_FILE and file_info.chunk_count == 13
    assert blob == b""
    assert np.array_equal(tensor.to_numpy(), strided)


@pytest.mark.parametrize("make", [np.asarray, pa.Tensor.from_numpy], ids=["numpy", "arrow"])
def test_a_scalar_tensor_keeps_its_empty_shape(serve, make):
    scalar = np.array(3.5, dtype=np.float32)

    async def scenario(served):
        data = served.data()
        info = await data.put_tensor(make(scalar), classification="internal")
        return info, await data.get_tensor(info.ref.payload_id), await data.get_arrow_tensor(info.ref.payload_id)

    info, back, arrow = serve(scenario)
    assert list(info.tensor.shape) == [] and info.ref.size == 4
    assert back.shape == () and back.dtype == np.float32 and back[()] == 3.5
    assert arrow.shape == () and arrow.to_numpy()[()] == 3.5


def test_received_tensor_is_a_view_of_one_buffer(serve):
    """No copy on the receive side beyond reassembly: the array points into the assembled buffer."""
    array = np.random.default_rng(1).standard_normal(MiB // 2).astype(np.float32)

    async def scenario(served):
        data = served.data(chunk_bytes=64 * 1024)
        info = await data.put_tensor(array, classification="internal")
        got_info, buffer = await data.get(info.ref.payload_id)
        view = np.frombuffer(buffer, dtype=np.float32)
        return view, buffer

    view, buffer = serve(scenario)
    assert view.ctypes.data == buffer.address and np.array_equal(view, array)


def test_in_process_client_takes_the_same_path(run, tmp_path):
    """A local plane client (no gRPC) works through the same DataClient."""
    from planes.kernel.host import Candidate, PluginHost
    from planes.kernel.kernel import Kernel
    from planes.plugins.data import DataPlugin
    from planes.plugins.evidence import EvidencePlugin
    from tests.conftest import make_settings

    async def main():
        settings = make_settings(tmp_path)
        plugins = [EvidencePlugin(), DataPlugin()]
        kernel = Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "t", p) for p in plugins])).open()
        await kernel.start()
        try:
            from planes.kernel.identity import Identity
            client = kernel.client(DataPlane, Identity("svc", "acme", frozenset({"service"})))
            data = DataClient(client, "acme", chunk_bytes=1000)
            info = await data.put(b"x" * 4500, classification="restricted")
            return info, await data.get_bytes(info.ref.payload_id, verify=True)
        finally:
            await kernel.stop()

    info, back = run(main())
    assert back == b"x" * 4500 and info.chunk_count == 5 and info.encrypted_at_rest
