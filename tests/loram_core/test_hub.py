"""`base.source` as a hub id: the rule that tells it from a path, the offline run from a local hub
cache, and one clear preflight error for a missing repo, a gated one, and no network.

No network is used: the hub cache is built on disk in huggingface_hub's own layout
(`tests/hub_cache.py`), and the hub's refusals come from a loopback HTTP server answering as the
hub does (status and `X-Error-Code`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from loram_core import steps
from loram_core.checks import preflight
from loram_core.config import load_config
from loram_core.errors import LoramError
from loram_core.hub import HubId, parse_hub_id
from loram_core.models import load_model
from tests.hub_cache import add_to_hub_cache, paragraphs, write_original

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "acme/tiny-llama-3"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A hub cache holding REPO_ID at main and at tag v1 (the same commit), plus the corpus files."""
    root = tmp_path_factory.mktemp("hub")
    original = write_original(root / "original")
    cache = root / "hub-cache"
    commit = add_to_hub_cache(cache, REPO_ID, original)
    (cache / "models--acme--tiny-llama-3" / "refs" / "v1").write_text(commit)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs(400, 2)) + "\n")
    return {"root": root, "cache": cache, "commit": commit, "original": original, "corpus": corpus}


@pytest.fixture
def offline(hub: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _cfg(hub: dict, tmp: Path, *extra: str):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"base.source={REPO_ID}", f"corpus.paths={hub['corpus']}", "corpus.seq_len=64",
        "corpus.max_tokens=20000", "corpus.eval_blocks=4", "calibration.samples=4", "until=prune",
        f"workdir={tmp / 'work'}", f"base.cache_dir={tmp / 'cache'}", "device=cpu",
        f"publish.uri=file://{tmp / 'bucket'}", "publish.version=v1", *extra,
    ])  # fmt: skip


def test_the_rule_tells_hub_ids_from_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("meta-llama/Llama-3.1-8B") == HubId("meta-llama/Llama-3.1-8B", "main")
    assert parse_hub_id("Qwen/Qwen2.5-0.5B@v1.0") == HubId("Qwen/Qwen2.5-0.5B", "v1.0")
    assert parse_hub_id("org/name@" + "a" * 40).revision == "a" * 40
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert parse_hub_id("models/llama") is None  # a path that exists wins
    assert parse_hub_id("hf://models/llama") == HubId("models/llama")  # ... unless hf:// says hub
    for local in ("demo", "s3://bucket/model", "./org/name", "/abs/org/name", "~/org/name", "a/b/c",
                  "org--x/name", "org/..", "org/name@"):  # fmt: skip
        assert parse_hub_id(local) is None, local
    with pytest.raises(LoramError, match="hf://ORG/NAME"):
        parse_hub_id("hf://not-a-repo")
    with pytest.raises(LoramError, match="base.source"):
        load_config(REPO / "configs" / "demo.yaml", ["base.source=hf://x"])


def test_only_safetensors_config_tokenizer_and_card_are_fetched() -> None:
    """The allow patterns on a Llama-3.1-like file list: no pickled or consolidated copies, no `original/`."""
    from huggingface_hub.utils import filter_repo_objects

    from loram_core.hub import HUB_FILES

    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    repo = ["LICENSE", "README.md", "USE_POLICY.md", ".gitattributes", "config.json", "generation_config.json",
            "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
            "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
            "consolidated.safetensors", "pytorch_model.bin", *shards]  # fmt: skip
    got = set(filter_repo_objects(repo, allow_patterns=HUB_FILES + shards))
    assert got == {"README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
                   "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", *shards}  # fmt: skip


def test_the_cache_is_huggingface_hubs_own_layout(offline: dict) -> None:
    from huggingface_hub import scan_cache_dir, snapshot_download

    info = scan_cache_dir(offline["cache"])
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and not info.warnings
    (revision,) = repo.revisions
    assert revision.commit_hash == offline["commit"] and revision.refs == {"main", "v1"}
    path = snapshot_download(REPO_ID, cache_dir=offline["cache"], local_files_only=True)
    assert Path(path).name == offline["commit"]


def test_offline_run_from_a_repo_id_publishes_its_origin_in_the_hf_layout(
    offline: dict, tmp_path: Path
) -> None:
    """Prune-only from `acme/tiny-llama-3@v1` with HF_HUB_OFFLINE=1: the manifest names repo, revision
    and commit with every file's sha256, the card's metadata names the original, and `model/` is in
    the Hugging Face layout (shards + index, the original's tokenizer, chat template and generation
    config byte for byte, tied head, llama3 rope) and loads stock: uniform widths, no remote code."""
    from huggingface_hub import ModelCard

    from loram_core.bucket import pull

    cfg = _cfg(offline, tmp_path, f"base.source={REPO_ID}@v1", "prune.strategy=structured",
               "prune.keep_first=0", "prune.keep_last=0", "publish.max_shard_size=40KB")  # fmt: skip
    preflight(cfg)
    base = steps.prepare_base(cfg)
    assert Path(base).name == offline["commit"]
    blocks = steps.prepare_corpus(cfg, base)
    pruned = steps.prune(cfg.prune, cfg.context, base, steps.prepare_calibration(cfg, base, blocks))
    evaluation = steps.evaluate(cfg, base, pruned, pruned, None, blocks)
    result = steps.publish(cfg, base, blocks, pruned, None, evaluation)
    dest = tmp_path / "pulled"
    manifest = pull(result["uri"], dest, cache=False)

    b = manifest.base
    assert (b["source"], b["repo_id"], b["revision"], b["commit"]) == (
        f"{REPO_ID}@v1", REPO_ID, "v1", offline["commit"])  # fmt: skip
    original = offline["original"]
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in original.iterdir()
                if p.name != "pytorch_model.bin"}  # fmt: skip
    assert b["files_sha256"] == expected and b["license"] == "llama3.1"

    card = ModelCard.load(dest / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == REPO_ID and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["license"] == "llama3.1"
    assert meta["tags"] == ["loram", "pruned", "structured"]
    assert (dest / "README.md").read_text().startswith("---\n")

    model_dir = dest / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model_dir / name).read_bytes() == (original / name).read_bytes(), name
    carried = [n for n in ("chat_template.jinja", "special_tokens_map.json") if (original / n).exists()]
    for name in carried:
        assert (model_dir / name).read_bytes() == (original / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>hi</s>"

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    from safetensors import safe_open

    names = set()
    for shard in shards:
        with safe_open(str(model_dir / shard), framework="pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        names |= set(keys)
        assert size <= 40_000 or len(keys) == 1, (shard, size)  # one tensor larger than the cap goes alone
    assert names == set(index["weight_map"]) and "lm_head.weight" not in names  # tied: stored once

    config = json.loads((model_dir / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "llama"
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (44, 2, 1, 16)  # fmt: skip
    assert config["loram"]["original"] == {"intermediate_size": 128, "num_attention_heads": 4,
                                           "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    stock = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # no trust_remote_code
    claimed = getattr(torch, config["dtype"])  # model/ is published in 16 bits; stock loads what it claims
    assert stock.dtype == claimed == torch.bfloat16
    assert stock.config.tie_word_embeddings
    assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
    assert stock.config.rope_parameters["rope_type"] == "llama3"
    reference = LlamaForCausalLM.from_pretrained(original)
    torch.testing.assert_close(stock.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, load_model(model_dir, dtype=claimed)(ids).logits)


def test_loram_run_from_a_repo_id_offline_publishes_its_origin(offline: dict, tmp_path: Path) -> None:
    """The command a publisher types: `loram run CONFIG base.source=ORG/NAME --until prune` with
    HF_HUB_OFFLINE=1 (the CLI's preflight, the flow, the publish) names the repo and commit."""
    import os
    import subprocess
    import sys

    from huggingface_hub import ModelCard

    from loram_core.bucket import verify_version

    bucket = tmp_path / "bucket"
    args = [f"base.source={REPO_ID}", f"corpus.paths={offline['corpus']}", "corpus.seq_len=64",
            "corpus.max_tokens=20000", "corpus.eval_blocks=4", "calibration.samples=4", "device=cpu",
            f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}", f"publish.uri=file://{bucket}",
            "publish.version=v1", "prune.strategy=structured", "prune.keep_first=0", "prune.keep_last=0"]  # fmt: skip
    # HF_HUB_CACHE and HF_HUB_OFFLINE=1 from the fixture; Prefect's temporary server may take as long
    # as a busy machine needs to start (no test waits on a clock).
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(10**9)}
    result = subprocess.run(
        [sys.executable, "-m", "loram_provider.flows.cli", "run", str(REPO / "configs" / "demo.yaml"), *args,
         "--until", "prune"], capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = verify_version(f"file://{bucket}/demo-llama/v1")
    assert (manifest.base["repo_id"], manifest.base["commit"]) == (REPO_ID, offline["commit"])
    meta = ModelCard.load(bucket / "demo-llama" / "v1" / "README.md").data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"]) == (REPO_ID, "finetune")
    config = json.loads((bucket / "demo-llama" / "v1" / "model" / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] == 44  # uniform widths: stock


def test_offline_without_the_repo_in_the_cache_is_one_preflight_error(offline: dict, tmp_path: Path) -> None:
    cfg = _cfg(offline, tmp_path, "base.source=acme/not-downloaded")
    with pytest.raises(LoramError) as err:
        preflight(cfg)
    message = str(err.value)
    assert "base.source='acme/not-downloaded'" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download acme/not-downloaded" in message
    assert not (tmp_path / "work").exists()  # nothing written


def test_offline_with_the_weights_missing_from_the_cache(
    offline: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A metadata-only download (as the preflight makes online): the base step names what is missing."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_bytes((offline["original"] / name).read_bytes())
    cache = tmp_path / "hub-cache"
    add_to_hub_cache(cache, "acme/partial", partial)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = _cfg(offline, tmp_path, "base.source=acme/partial")
    with pytest.raises(LoramError, match=r"lacks model\.safetensors .*hf download acme/partial"):
        steps.prepare_base(cfg)


class _Hub(BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a missing, gated or absent-revision repo."""

    answers = {"missing": (404, "RepoNotFound"), "gated": (401, "GatedRepo"),
               "norev": (404, "RevisionNotFound")}  # fmt: skip

    seen_auth: list[str] = []  # the Authorization headers received

    def _answer(self) -> None:
        self.seen_auth.append(self.headers.get("Authorization", ""))
        kind = next((k for k in self.answers if f"/{k}" in self.path), "missing")
        status, code = self.answers[kind]
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = _answer  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The hub at a loopback address (the process was imported offline: switch that off for the test)."""
    import huggingface_hub.constants as hub_constants

    server = HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hub_constants
    server.shutdown()


@pytest.mark.parametrize(
    ("repo", "says"),
    [
        ("acme/missing", r"no model repository 'acme/missing' on the hub .*HF_TOKEN is not set"),
        (
            "acme/gated",
            r"acme/gated is a gated repository and HF_TOKEN is not set.*huggingface.co/acme/gated",
        ),
        ("acme/norev@v9", r"acme/norev has no revision 'v9'; write ORG/NAME@BRANCH"),
    ],
)
def test_hub_refusals_are_one_preflight_error_naming_repo_and_fix(
    online, hub: dict, tmp_path: Path, repo: str, says: str
) -> None:
    with pytest.raises(LoramError, match=says) as err:
        preflight(_cfg(hub, tmp_path, f"base.source={repo}"))
    assert str(err.value).startswith(f"base.source={repo!r}")


def test_no_network_is_one_preflight_error(online, hub: dict, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online.ENDPOINT = f"http://127.0.0.1:{port}"
    with pytest.raises(LoramError, match=r"the hub cannot be reached .*holds no snapshot.*HF_HUB_OFFLINE=1"):
        preflight(_cfg(hub, tmp_path, "base.source=acme/anything"))


def test_loram_plan_reads_a_hub_base_from_its_config_alone(offline: dict, tmp_path: Path) -> None:
    """`loram plan CONFIG` with a hub id: config.json from the cache (no weights), the stock-or-code line."""
    from loram_core.demo import base_model_config
    from loram_core.prune.plan import loading, plan

    cfg = _cfg(offline, tmp_path, "prune.strategy=structured", "prune.keep_first=0", "prune.keep_last=0")
    config = base_model_config(cfg.base)
    assert (config.num_hidden_layers, config.intermediate_size, config.tie_word_embeddings) == (3, 128, True)
    assert plan(config, cfg.prune).pruned_layers == [0, 1, 2] and loading(config, cfg.prune) == "stock"
    assert loading(config, cfg.prune.model_copy(update={"keep_first": 1})) == "remote code"


def test_hf_token_comes_from_the_environment(
    online, hub: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_loram_test_token")
    _Hub.seen_auth.clear()
    with pytest.raises(
        LoramError, match="acme/gated is a gated repository and the HF_TOKEN set has no access"
    ) as err:
        preflight(_cfg(hub, tmp_path, "base.source=acme/gated"))
    assert "Bearer hf_loram_test_token" in _Hub.seen_auth
    assert "hf_loram_test_token" not in str(err.value)  # the token is never printed
