"""The wire contract: public field names, stub imports, and freshness of the generated code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from specmesh import protogen
from specmesh.v1 import (
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

_T = FieldDescriptor
# name -> (type, repeated, has explicit presence ("optional"))
GENERATE_REQUEST = {
    "prompt": (_T.TYPE_STRING, False, False),
    "messages": (_T.TYPE_MESSAGE, True, False),
    "max_tokens": (_T.TYPE_INT32, False, True),
    "temperature": (_T.TYPE_FLOAT, False, True),
    "top_p": (_T.TYPE_FLOAT, False, True),
    "top_k": (_T.TYPE_INT32, False, True),
    "seed": (_T.TYPE_UINT64, False, True),
    "stop": (_T.TYPE_STRING, True, False),
    "disable_speculation": (_T.TYPE_BOOL, False, False),
    "request_id": (_T.TYPE_STRING, False, False),
    "logprobs": (_T.TYPE_BOOL, False, False),
    "max_draft_tokens": (_T.TYPE_INT32, False, True),
}
GENERATE_RESPONSE = {
    "text": (_T.TYPE_STRING, False, False),
    "token_ids": (_T.TYPE_INT32, True, False),
    "finish_reason": (_T.TYPE_STRING, False, False),
    "usage": (_T.TYPE_MESSAGE, False, True),
    "speculation": (_T.TYPE_MESSAGE, False, True),
    "logprobs": (_T.TYPE_MESSAGE, True, False),
    "request_id": (_T.TYPE_STRING, False, False),
}


def _fields(message_class) -> dict[str, tuple[int, bool, bool]]:
    return {
        f.name: (f.type, f.is_repeated, f.has_presence)
        for f in message_class.DESCRIPTOR.fields
    }


def _names(message_class) -> set[str]:
    return {f.name for f in message_class.DESCRIPTOR.fields}


def test_generate_request_fields_exact() -> None:
    assert _fields(generation_pb2.GenerateRequest) == GENERATE_REQUEST
    request = generation_pb2.GenerateRequest
    assert request.DESCRIPTOR.fields_by_name["messages"].message_type.full_name == "specmesh.v1.ChatMessage"
    assert _names(generation_pb2.ChatMessage) == {"role", "content"}


def test_generate_response_fields_exact() -> None:
    assert _fields(generation_pb2.GenerateResponse) == GENERATE_RESPONSE
    by_name = generation_pb2.GenerateResponse.DESCRIPTOR.fields_by_name
    assert by_name["usage"].message_type.full_name == "specmesh.v1.Usage"
    assert by_name["speculation"].message_type.full_name == "specmesh.v1.SpeculationStats"
    assert by_name["logprobs"].message_type.full_name == "specmesh.v1.TokenLogprob"
    assert _names(common_pb2.Usage) == {"prompt_tokens", "completion_tokens"}
    assert _names(common_pb2.SpeculationStats) == {"drafted_tokens", "accepted_tokens", "rounds"}
    assert _names(common_pb2.TokenLogprob) == {"token_id", "logprob"}


def test_optional_zero_is_distinguishable_from_unset() -> None:
    unset = generation_pb2.GenerateRequest(prompt="hi")
    greedy = generation_pb2.GenerateRequest(prompt="hi", temperature=0.0, seed=0, top_k=0)
    assert not unset.HasField("temperature") and not unset.HasField("seed")
    assert greedy.HasField("temperature") and greedy.HasField("seed") and greedy.HasField("top_k")
    decoded = generation_pb2.GenerateRequest.FromString(greedy.SerializeToString())
    assert decoded.HasField("temperature") and decoded.temperature == 0.0


def test_public_service_shape() -> None:
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "specmesh.v1.Generation"
    method = service.methods_by_name["Generate"]
    assert method.input_type.full_name == "specmesh.v1.GenerateRequest"
    assert method.output_type.full_name == "specmesh.v1.GenerateResponse"
    assert not method.client_streaming and method.server_streaming


@pytest.mark.parametrize(
    ("module", "service", "methods"),
    [
        (scheduler_pb2, "Scheduler", {"Generate": (False, True), "Stats": (False, False)}),
        (
            verifier_pb2,
            "Verifier",
            {"Verify": (False, False), "Release": (False, False), "Profile": (False, False), "Stats": (False, False)},
        ),
        (
            drafter_pb2,
            "Drafter",
            {"Draft": (True, True), "Release": (False, False), "Profile": (False, False), "Stats": (False, False)},
        ),
    ],
)
def test_internal_services_shape(module, service, methods) -> None:
    descriptor = module.DESCRIPTOR.services_by_name[service]
    found = {m.name: (m.client_streaming, m.server_streaming) for m in descriptor.methods}
    assert found == methods


def test_internal_messages_have_contract_fields() -> None:
    assert {"session_id", "num_cached_tokens", "new_tokens", "draft_tokens", "draft_distributions",
            "sampling", "num_generated_tokens", "want_logprobs"} <= _names(verifier_pb2.VerifyItem)
    assert {"session_id", "status", "accepted_count", "next_token", "logprobs",
            "num_cached_tokens", "cache_miss"} <= _names(verifier_pb2.VerifyResult)
    assert {"session_id", "sequence", "status", "base_length", "tokens", "confidences",
            "distributions", "last", "batch"} <= _names(drafter_pb2.DraftChunk)
    assert [f.name for f in drafter_pb2.DraftRequest.DESCRIPTOR.oneofs_by_name["kind"].fields] == [
        "sync", "release", "sync_batch"]
    assert {"syncs"} == _names(drafter_pb2.DraftSyncBatch)
    assert {"request_id", "prompt_token_ids", "sampling", "max_tokens", "stop_token_ids",
            "disable_speculation", "max_draft_tokens", "logprobs"} <= _names(scheduler_pb2.ScheduleRequest)
    assert {"temperature", "top_p", "top_k", "seed", "has_seed"} == _names(common_pb2.SamplingParams)
    assert {"token_ids", "probs"} == _names(common_pb2.SparseDistribution)
    assert {"batch_tokens", "forward_seconds"} == _names(common_pb2.CostPoint)
    statuses = {v.name for v in common_pb2.SessionStatus.DESCRIPTOR.values}
    assert {"SESSION_STATUS_OK", "SESSION_STATUS_CACHE_MISS"} <= statuses


def test_stubs_import_and_serve_over_loopback() -> None:
    """The generated stubs work end to end under the installed grpcio."""
    for module, name in [
        (generation_pb2_grpc, "Generation"),
        (scheduler_pb2_grpc, "Scheduler"),
        (verifier_pb2_grpc, "Verifier"),
        (drafter_pb2_grpc, "Drafter"),
    ]:
        assert hasattr(module, f"{name}Stub") and hasattr(module, f"{name}Servicer")
        assert hasattr(module, f"add_{name}Servicer_to_server")

    class Echo(generation_pb2_grpc.GenerationServicer):
        def Generate(self, request, context):
            for i, word in enumerate(request.prompt.split()):
                yield generation_pb2.GenerateResponse(text=word, token_ids=[i], request_id=request.request_id)
            yield generation_pb2.GenerateResponse(finish_reason="stop", usage=common_pb2.Usage(completion_tokens=i + 1))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generation_pb2_grpc.add_GenerationServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            replies = list(stub.Generate(generation_pb2.GenerateRequest(prompt="a b", request_id="r1"), timeout=10))
    finally:
        server.stop(None)
    assert [r.text for r in replies] == ["a", "b", ""]
    assert replies[0].request_id == "r1"
    assert replies[-1].finish_reason == "stop" and replies[-1].usage.completion_tokens == 2


def test_committed_stubs_are_current() -> None:
    stale = protogen.find_stale(protogen.PROTO_ROOT, protogen.OUT_ROOT)
    assert stale == [], "run `python -m specmesh.protogen`: " + ", ".join(map(str, stale))
    assert (REPO_ROOT / "specmesh" / "v1" / "__init__.py").is_file()


def test_check_cli_passes_on_committed_tree() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "specmesh.protogen", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = protogen.generate(protogen.PROTO_ROOT, tmp_path / "a")
    second = protogen.generate(protogen.PROTO_ROOT, tmp_path / "b")
    assert first == second
    for rel in first:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_stale_files_are_detected(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generated = protogen.generate(protogen.PROTO_ROOT, out)
    assert protogen.find_stale(protogen.PROTO_ROOT, out) == []

    edited = out / "specmesh/v1/verifier_pb2.py"
    edited.write_text(edited.read_text() + "# hand edit\n")
    (out / "specmesh/v1/drafter_pb2.pyi").unlink()
    (out / "specmesh/v1/removed_pb2.py").write_text("# left over from a deleted .proto\n")

    stale = {s.path: s.reason for s in protogen.find_stale(protogen.PROTO_ROOT, out)}
    assert stale == {
        "specmesh/v1/verifier_pb2.py": "differs",
        "specmesh/v1/drafter_pb2.pyi": "missing",
        "specmesh/v1/removed_pb2.py": "orphan (no .proto generates it)",
    }

    result = subprocess.run(
        [sys.executable, "-m", "specmesh.protogen", "--check", "--out-root", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "stale" in result.stderr and "specmesh/v1/verifier_pb2.py (differs)" in result.stderr

    # Regenerating repairs exactly those files.
    changed = protogen.regenerate(protogen.PROTO_ROOT, out)
    assert {c.path for c in changed} == set(stale)
    assert protogen.find_stale(protogen.PROTO_ROOT, out) == []
    assert sorted(generated) == sorted(
        p.relative_to(out).as_posix() for p in (out / "specmesh/v1").iterdir() if p.name.endswith(protogen.GENERATED_SUFFIXES)
    )


def test_proto_edit_makes_stubs_stale(tmp_path: Path) -> None:
    proto_root = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_ROOT, proto_root)
    common = proto_root / "specmesh/v1/common.proto"
    common.write_text(common.read_text().replace("int32 rounds = 3;", "int32 rounds = 3;\n  int32 extra = 4;"))
    stale = {s.path for s in protogen.find_stale(proto_root, protogen.OUT_ROOT)}
    assert {"specmesh/v1/common_pb2.py", "specmesh/v1/common_pb2.pyi"} <= stale
