"""Who may put and read, every limit at limit-1, limit and limit+1, and malformed or lying streams.

Each refused put leaves nothing behind: no payload row, no file, no quota used.
"""

from __future__ import annotations

import blake3
import pytest

from planes.common.v1 import common_pb2
from planes.data.v1 import data_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.contract import Encoded
from planes.kernel.contracts import DataPlane
from planes.native import load

codec = load("codec")

BLAKE3 = common_pb2.DIGEST_ALGORITHM_BLAKE3


def header(size: int, *, tenant="acme", classification=common_pb2.CLASSIFICATION_INTERNAL, chunks=0,
           digest: bytes | None = None) -> Encoded:
    made = pb.PayloadHeader(tenant=tenant, classification=classification, kind=pb.CONTENT_KIND_BLOB,
                            declared_size=size, declared_chunk_count=chunks,
                            declared_digest=common_pb2.Digest(algorithm=BLAKE3, value=digest or b""))
    return Encoded(pb.PutPayloadRequest(header=made).SerializeToString())


def chunk(data: bytes, offset: int) -> Encoded:
    return Encoded(codec.encode_chunk(data, offset, digest=False))


def trailer(data: bytes) -> Encoded:
    digest = common_pb2.Digest(algorithm=BLAKE3, value=blake3.blake3(data).digest())
    return Encoded(pb.PutPayloadRequest(trailer=pb.PayloadTrailer(declared_digest=digest)).SerializeToString())


async def put_raw(client, *messages):
    async def stream():
        for message in messages:
            yield message
    return pb.PutPayloadResponse.FromString(await client.wire("put_payload")(stream(), timeout=10))


def whole(data: bytes, step: int, **options):
    """Header, chunks of ``step`` bytes and trailer of a well-formed put of ``data``."""
    return (header(len(data), **options), *(chunk(data[i:i + step], i) for i in range(0, len(data), step)),
            trailer(data))


def nothing_left(served) -> None:
    data_dir = served.state_dir / "data"
    assert list((data_dir / "incoming").iterdir()) == [], "a refused put leaves no partial file"
    assert list((data_dir / "objects").iterdir()) == [], "a refused put stores no object"


def test_reads_are_per_tenant_and_admin_alone_reads_nothing(serve):
    async def scenario(served):
        acme = served.data("acme")
        info = await acme.put(b"acme's numbers", classification="internal")
        payload_id = info.ref.payload_id
        outcomes = {}
        for name, client in {
            "admin": served.data("*", roles=("admin",)),
            "other tenant": served.data("globex"),
            "operator": served.data("acme", roles=("operator",)),
        }.items():
            try:
                await client.get(payload_id)
                outcomes[name] = "read"
            except errors.PlanesError as exc:
                outcomes[name] = type(exc).__name__
        with pytest.raises(errors.PermissionDenied, match="tenant acme"):
            await served.data("globex").client.wire("put_payload")(_one(header(1, tenant="acme")), timeout=5)
        with pytest.raises(errors.NotFound):
            await served.data("globex").stat(payload_id)
        anonymous = served.remote(DataPlane)
        anonymous.__init__(anonymous.spec, anonymous.channel, None)
        with pytest.raises(errors.Unauthenticated):
            await anonymous.stat_payload(pb.StatPayloadRequest(tenant="acme", payload_id=payload_id))
        # The operator may see metadata, never bytes.
        stat = await served.data("acme", roles=("operator",)).stat(payload_id)
        return outcomes, stat

    outcomes, stat = serve(scenario)
    assert outcomes == {"admin": "PermissionDenied", "other tenant": "NotFound", "operator": "PermissionDenied"}
    assert stat.ref.size == len(b"acme's numbers")


async def _one(message):
    yield message


@pytest.mark.parametrize("setting, header_options, limit_name", [
    ({"max_payload_bytes": 1000}, {}, "payload size"),
    ({"classification_max_bytes": {"restricted": 1000}},
     {"classification": common_pb2.CLASSIFICATION_RESTRICTED}, "restricted payload size"),
    ({"tenant_max_payload_bytes": {"acme": 1000}}, {}, "tenant payload size"),
])
def test_declared_size_limits_at_the_boundary(serve, setting, header_options, limit_name):
    async def scenario(served):
        client = served.remote()
        results = {}
        for size in (999, 1000, 1001):
            data = bytes(size)
            try:
                response = await put_raw(client, *whole(data, 400, **header_options))
                results[size] = response.payload.ref.size
            except errors.LimitExceeded as exc:
                results[size] = (exc.name, exc.limit, exc.actual)
        return results

    assert serve(scenario, data_settings=setting) == {999: 999, 1000: 1000, 1001: (limit_name, 1000, 1001)}


def test_chunk_size_and_count_limits_at_the_boundary(serve):
    async def scenario(served):
        client = served.remote()
        results = {}
        for size in (255, 256, 257):
            try:
                await put_raw(client, *whole(bytes(size), size))
                results[("chunk", size)] = "ok"
            except errors.LimitExceeded as exc:
                results[("chunk", size)] = (exc.name, exc.limit, exc.actual)
        for count in (3, 4, 5):
            try:
                await put_raw(client, *whole(bytes(count * 10), 10))
                results[("count", count)] = "ok"
            except errors.LimitExceeded as exc:
                results[("count", count)] = (exc.name, exc.limit, exc.actual)
        try:
            await put_raw(client, header(50, chunks=5))
        except errors.LimitExceeded as exc:
            results["declared count"] = (exc.name, exc.limit, exc.actual)
        return results

    results = serve(scenario, data_settings={"max_chunk_bytes": 256, "get_chunk_bytes": 256, "max_chunks": 4})
    assert results == {
        ("chunk", 255): "ok", ("chunk", 256): "ok", ("chunk", 257): ("chunk size", 256, 257),
        ("count", 3): "ok", ("count", 4): "ok", ("count", 5): ("chunk count", 4, 5),
        "declared count": ("chunk count", 4, 5),
    }


def test_tenant_quota_refuses_with_limit_and_retry_delay(serve):
    async def scenario(served):
        data = served.data("acme")
        first = await data.put(bytes(1000), classification="internal", ttl=3600)
        second = await data.put(bytes(1000), classification="internal", ttl=3600)
        with pytest.raises(errors.LimitExceeded) as refused:
            await data.put(bytes(1001), classification="internal")
        exact = await data.put(bytes(1000), classification="internal")     # exactly at the quota
        await data.delete(first.ref.payload_id)
        after_delete = await data.put(bytes(500), classification="internal")
        other = await served.data("globex").put(bytes(3000), classification="internal")
        return refused.value, exact, after_delete, other, second

    refused, exact, after_delete, other, second = serve(scenario, data_settings={"quota_bytes": 3000})
    assert (refused.name, refused.limit, refused.actual) == ("tenant byte quota", 3000, 3001)
    assert refused.retry_after is not None and 3500 < refused.retry_after <= 3600, \
        "retry when the earliest payload expires"
    assert exact.ref.size == 1000 and after_delete.ref.size == 500, "deleting frees quota"
    assert other.ref.size == 3000, "quotas are per tenant"


@pytest.mark.parametrize("case, expected", [
    ("no header", (errors.InvalidArgument, "must start with a header")),
    ("empty stream", (errors.InvalidArgument, "ended before its header")),
    ("second header", (errors.InvalidArgument, "second header")),
    ("gap", (errors.InvalidArgument, "leaves a gap")),
    ("overlap (a replayed chunk)", (errors.InvalidArgument, "overlaps")),
    ("overrun", (errors.LimitExceeded, "runs past the declared size")),
    ("truncated chunk", (errors.InvalidArgument, "malformed chunk")),
    ("garbage", (errors.InvalidArgument, "no header, chunk or trailer")),
    ("chunk after trailer", (errors.InvalidArgument, "after the trailer")),
    ("no digest", (errors.InvalidArgument, "content digest must be declared")),
    ("trailer of another algorithm", (errors.InvalidArgument, "header announced blake3")),
    ("bad digest length", (errors.InvalidArgument, "32 bytes")),
    ("no classification", (errors.InvalidArgument, "needs a classification")),
])
def test_malformed_streams_are_refused_and_leave_nothing(serve, case, expected):
    data = b"0123456789" * 10
    good = chunk(data[:50], 0)
    streams = {
        "no header": (good,),
        "empty stream": (),
        "second header": (header(100), header(100)),
        "gap": (header(100), chunk(data[:40], 0), chunk(data[50:], 50)),
        "overlap (a replayed chunk)": (header(100), good, good),
        "overrun": (header(60), good, chunk(data[50:], 50)),
        "truncated chunk": (header(100), Encoded(good.data[:-7])),
        "garbage": (header(100), Encoded(b"\xff\xfe\x00garbage")),
        "chunk after trailer": (header(100), good, trailer(data), chunk(data[50:], 50)),
        "no digest": (Encoded(pb.PutPayloadRequest(header=pb.PayloadHeader(
            tenant="acme", classification=2, kind=1, declared_size=50)).SerializeToString()), good),
        "trailer of another algorithm": (header(50), good, Encoded(pb.PutPayloadRequest(trailer=pb.PayloadTrailer(
            declared_digest=common_pb2.Digest(algorithm=common_pb2.DIGEST_ALGORITHM_SHA256, value=bytes(32))))
            .SerializeToString())),
        "bad digest length": (header(50, digest=b"short"), good),
        "no classification": (header(50, classification=0), good),
    }

    async def scenario(served):
        client = served.remote()
        with pytest.raises(expected[0], match=expected[1]):
            await put_raw(client, *streams[case])
        nothing_left(served)
        # The plane is unharmed: a good put right after works.
        return (await put_raw(client, *whole(data, 30))).payload

    assert serve(scenario).ref.size == 100


def test_workers_reach_only_the_payloads_of_their_task_attempt(serve):
    """A worker token alone reads nothing; its lease's credential opens its task's payloads, until it expires."""
    import time

    from planes.plugins.execution.credentials import issue_credential

    async def scenario(served):
        service = served.data()
        mine = await service.put(b"the task's input", classification="internal")
        other = await service.put(b"someone else's", classification="internal")
        key = served.kernel.signing_key

        def worker(**claims):
            scope = dict(tenant="acme", task_id="t-1", attempt_epoch=1, payload_ids=[mine.ref.payload_id],
                         expires_at=time.time() + 60)
            scope.update(claims)
            token = issue_credential(key, **scope).token
            return served.data(roles=("worker",), task_credential=token)

        outcomes = {}
        for name, client, payload in [
            ("no credential", served.data(roles=("worker",)), mine),
            ("own payload", worker(), mine),
            ("other payload", worker(), other),
            ("expired", worker(expires_at=time.time() - 1), mine),
            ("other tenant's credential", worker(tenant="globex"), mine),
            ("forged", served.data(roles=("worker",), task_credential=worker().task_credential[:-4] + "AAAA"),
             mine),
        ]:
            try:
                outcomes[name] = await client.get_bytes(payload.ref.payload_id)
            except errors.PlanesError as exc:
                outcomes[name] = type(exc).__name__
        written = await worker(payload_ids=[]).put(b"the task's output", classification="internal")
        try:
            await served.data(roles=("worker",)).put(b"x", classification="internal")
            outcomes["put without credential"] = "stored"
        except errors.PlanesError as exc:
            outcomes["put without credential"] = type(exc).__name__
        return outcomes, written

    outcomes, written = serve(scenario)
    assert outcomes == {
        "no credential": "PermissionDenied",
        "own payload": b"the task's input",
        "other payload": "PermissionDenied",
        "expired": "Unauthenticated",
        "other tenant's credential": "PermissionDenied",
        "forged": "Unauthenticated",
        "put without credential": "PermissionDenied",
    }
    assert written.ref.size == len(b"the task's output")


def test_a_ttl_of_zero_is_the_default_and_a_negative_one_is_refused(serve):
    """The proto's word: 0 means the tenant's default. A negative ttl never meant 'keep forever'."""
    day = 86400

    async def scenario(served):
        data = served.data()
        zero = await data.put(b"kept for the default", classification="internal", ttl=0)
        unset = await data.put(b"kept for the default", classification="internal")
        hour = await data.put(b"kept an hour", classification="internal", ttl=3600)
        refused = {}
        for ttl in (-5, 400 * 365 * 10 * day):
            with pytest.raises(errors.InvalidArgument, match="ttl") as caught:
                await data.put(b"x", classification="internal", ttl=ttl)
            refused[ttl] = str(caught.value)
        return zero, unset, hour, refused, served.plugin.plane.store.held_bytes("acme", 0)

    zero, unset, hour, refused, held = serve(scenario, data_settings={"default_ttl_seconds": 2 * day})
    lifetime = {name: (info.expires_at.ToSeconds() - info.created_at.ToSeconds()) if info.HasField("expires_at")
                else None for name, info in (("zero", zero), ("unset", unset), ("hour", hour))}
    assert lifetime == {"zero": 2 * day, "unset": 2 * day, "hour": 3600}
    assert "-5.000 s" in refused[-5] and "0 for the tenant's default" in refused[-5]
    assert "past what the catalogue holds" in refused[400 * 365 * 10 * day]
    assert held == 2 * len(b"kept for the default") + len(b"kept an hour"), "refused puts stored nothing"


@pytest.mark.parametrize("limit", ["quota_bytes", "max_payload_bytes"])
def test_a_large_put_refused_early_reaches_the_producer_as_the_refusal(serve, limit):
    """The refusal arrives while 1 MiB chunks are still being written: the producer sees it, not
    grpc.aio's ``Internal error from Core`` (grpc/grpc#36066), every time."""
    size = 32 << 20
    payload = bytes(size)

    async def scenario(served):
        data = served.data("acme", chunk_bytes=1 << 20)
        seen = []
        for _ in range(25):
            with pytest.raises(errors.PlanesError) as refused:
                await data.put(payload, classification="internal", timeout=30)
            seen.append(refused.value)
        stored = served.plugin.store.held_bytes("acme", 0)
        return seen, stored, sorted(p.name for p in (served.state_dir / "data" / "objects").iterdir())

    seen, stored, objects = serve(scenario, data_settings={limit: 8 << 20})
    assert {type(error) for error in seen} == {errors.LimitExceeded}
    assert {(error.limit, error.actual) for error in seen} == {(8 << 20, size)}
    assert (stored, objects) == (0, []), "a refused put leaves nothing behind"
