"""The contracts in proto/: compile with a separate protoc run, every plane service present and guarded."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"

#: Every service the plane contracts must define.
SERVICES = {
    "planes/control/v1/control_service.proto": ["planes.control.v1.ControlService"],
    "planes/execution/v1/execution_service.proto": ["planes.execution.v1.TaskService",
                                                    "planes.execution.v1.WorkerService"],
    "planes/data/v1/data_service.proto": ["planes.data.v1.DataService"],
    "planes/evidence/v1/evidence_service.proto": ["planes.evidence.v1.EvidenceService"],
    "planes/diagnostics/v1/diagnostics_service.proto": ["planes.diagnostics.v1.DiagnosticsService"],
}


def _protoc() -> list[str]:
    """The system's plain protoc when installed (CI installs it), else the one in grpcio-tools."""
    system = shutil.which("protoc")
    if system:
        return [system]
    import grpc_tools

    return [sys.executable, "-m", "grpc_tools.protoc", f"-I{Path(grpc_tools.__file__).parent / '_proto'}"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .proto in a separate protoc run, with no gRPC plugin, into a temporary directory."""
    out = tmp_path_factory.mktemp("protoc")
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    descriptor_set = out / "all.pb"
    result = subprocess.run(
        [*_protoc(), f"-I{PROTO}", "--include_imports", f"--descriptor_set_out={descriptor_set}",
         f"--python_out={out}", *protos],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "planes" / "control" / "v1" / "control_service_pb2.py").exists()
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return {f.name: f for f in files.file}, out


def test_every_plane_service_is_there(compiled):
    files, _ = compiled
    for path, services in SERVICES.items():
        assert path in files, f"{path} missing"
        declared = {f"{files[path].package}.{s.name}" for s in files[path].service}
        assert set(services) <= declared, f"{path}: {declared}"


def test_packages_follow_directories_and_carry_no_language_options(compiled):
    files, _ = compiled
    for name, file in files.items():
        if not name.startswith("planes/"):
            continue
        assert file.package == name.rsplit("/", 1)[0].replace("/", "."), name
        assert file.package.split(".")[-1] == "v1"
        options = file.options
        for language_option in ("java_package", "go_package", "csharp_namespace", "objc_class_prefix"):
            assert not options.HasField(language_option), f"{name} sets {language_option}"


def test_every_rpc_names_its_roles_and_messages_follow_buf_style(compiled):
    files, _ = compiled
    from planes.common.v1 import options_pb2

    for name, file in files.items():
        if not name.startswith("planes/") or not file.service:
            continue
        module = importlib.import_module(name.replace("/", ".").removesuffix(".proto") + "_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            assert service.name.endswith("Service"), service.full_name
            for method in service.methods:
                policy = method.GetOptions().Extensions[options_pb2.method_policy]
                assert list(policy.roles), f"{method.full_name} has no method_policy roles"
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name


def test_enums_start_with_unspecified(compiled):
    files, _ = compiled

    def enums(file):
        yield from file.enum_type
        stack = list(file.message_type)
        while stack:
            message = stack.pop()
            yield from message.enum_type
            stack.extend(message.nested_type)

    for name, file in files.items():
        if name.startswith("planes/"):
            for enum in enums(file):
                assert enum.value[0].number == 0 and enum.value[0].name.endswith("_UNSPECIFIED"), enum.name


def test_contract_classes_mirror_their_services():
    from planes.kernel.contract import PlaneSpec
    from planes.kernel.contracts import CONTRACTS

    assert {c.service for c in CONTRACTS} == {s for services in SERVICES.values() for s in services}
    for contract in CONTRACTS:
        PlaneSpec(contract).check_contract_class()
