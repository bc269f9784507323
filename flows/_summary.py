"""What `loram run` and `loram inspect` print about a version: short tables a person reads.

Only rich and our light modules load here (no torch, no Prefect), so `loram inspect` answers at once.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from loram_core.report import format_bytes, format_gib, recovery_sentence


def print_run_summary(console: Console, result: dict) -> None:
    """The run's result: where the version is, perplexity and memory per model, sizes, LATEST."""
    from loram_core.card import consumer_uri, version_size_rows

    m, p = result["metrics"], result["params"]
    publish = result.get("publish", {})
    status = publish.get("status", "published")
    # The URI on a line of its own, unwrapped (a table title would wrap it): absolute, usable from anywhere.
    console.print(f"{status} {consumer_uri(result['uri'])}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("model")
    table.add_column("held-out perplexity", justify="right")
    table.add_column("stored parameters", justify="right")
    table.add_column("weights memory", justify="right")
    stored = p.get("stored_params", p["pruned_params"])
    sixteen = format_gib(p.get("hbm_gb", stored * 2 / 2**30))
    table.add_row("original", f"{m['original_ppl']:.2f}", f"{p['original_params']:,}",
                  format_gib(p["original_params"] * 2 / 2**30))  # fmt: skip
    table.add_row("pruned", f"{m['pruned_ppl']:.2f}", f"{stored:,}", sixteen)
    if "aligned_ppl" in m:
        table.add_row("aligned", f"{m['aligned_ppl']:.2f}", f"{stored:,}", sixteen)
    nf4 = False
    for key, label in (("aligned_nf4_ppl", "aligned, NF4"), ("pruned_nf4_ppl", "pruned, NF4")):
        if key in m:
            nf4 = True
            table.add_row(label, f"{m[key]:.2f}", f"{stored:,}", format_gib(p["hbm_gb_4bit_actual"]))
    console.print(table)
    compute = result.get("compute") or {}
    if compute:
        console.print(
            f"computed on {compute['device']} ({compute.get('name', '')})", highlight=False, soft_wrap=True
        )
    sizes = Table(title="size", show_header=False)
    sizes.add_column("quantity")
    sizes.add_column("value", justify="right")
    for label, value in version_size_rows(p, nf4):
        shown = (
            f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        )
        sizes.add_row(label, shown)
    console.print(sizes)
    if "aligned_ppl" in m:  # only a run that aligned has anything to say about recovery
        console.print(recovery_sentence(m), highlight=False, soft_wrap=True)
    if result.get("verification"):
        print_verification(console, result["verification"])
    latest = publish.get("latest")
    if status == "unchanged":
        console.print(
            "unchanged: every step was reused and this version already holds the same content; nothing "
            "was published",
            highlight=False,
            soft_wrap=True,
        )
    if latest:
        where = "now names this version" if latest["moved"] else "was left where it was"
        console.print(f"LATEST {where} ({latest['reason']})", highlight=False, soft_wrap=True)


def print_verification(console: Console, verification: dict) -> None:
    """The LoRA ablation's table (`verify` section), as the card shows it."""
    from loram_core.verify.report import table_rows

    title = "LoRA trained small, inferred large (held-out task loss, mean ± std over seeds, lower is better)"
    table = Table(title=title)
    rows = table_rows(verification)
    for col in rows[0]:
        table.add_column(
            col, justify="right" if col in ("task loss", "vs LoRAM", "token accuracy") else "left"
        )
    for r in rows:
        table.add_row(*r.values())
    console.print(table)


def version_lines(manifest, uri: str) -> list[tuple[str, str]]:
    """`loram inspect`'s summary of a verified version: (label, text) rows."""
    from loram_core.card import consumer_uri

    m = manifest
    base, prune, p, metrics = m.base, m.prune, m.params, m.metrics
    size = sum(f.size for f in m.files)
    rows = [("version", f"{m.name}/{m.version}, created {m.created_at}, code {m.code_version}"),
            ("where", consumer_uri(uri)),
            ("files", f"{len(m.files):,} files, {format_bytes(size)}: every size and sha256 matches the manifest")]  # fmt: skip
    if base:
        rows.append(
            (
                "base",
                f"{base.get('source')} ({base.get('model_type', '?')}, {base.get('num_hidden_layers', '?')} "
                f"layers), fingerprint {base.get('fingerprint', 'n/a')}",
            )  # fmt: skip
        )
    if prune:
        counts = ""
        if p.get("original_params"):
            stored = p.get("stored_params", p.get("pruned_params", 0))
            counts = (
                f": {p['original_params']:,} -> {stored:,} stored parameters ({p.get('reduction', 0):.2f}x)"
            )
        rows.append(("pruned", f"{prune.get('strategy')} at {prune.get('ratio')}{counts}"))
    if m.align.get("enabled", False):
        facts = [f"{m.align.get('steps')} steps"]
        if "tokens_seen" in m.align:
            facts.append(f"{m.align['tokens_seen']:,} tokens")
        if "final_loss" in m.align:
            facts.append(f"final loss {m.align['final_loss']:.3f}")
        rows.append(("aligned", ", ".join(facts)))
    else:
        rows.append(("aligned", "no (model/ is the pruned model)"))
    nf4 = [f for f in m.files if f.path.startswith("model-nf4/")]
    rows.append(("NF4", f"model-nf4/ ({format_bytes(sum(f.size for f in nf4))})" if nf4 else "no model-nf4/"))
    ppl = {k: v for k, v in metrics.items() if k.endswith("_ppl") and isinstance(v, (int, float))}
    if ppl:
        text = ", ".join(f"{k.removesuffix('_ppl').replace('_', ' ')} {v:.2f}" for k, v in ppl.items())
        tokens = metrics.get("heldout_tokens")
        rows.append(("perplexity", text + (f" (held out, {tokens:,} tokens)" if tokens else "")))
    if m.verification:
        loram = next((r for r in m.verification.get("rows", []) if r.get("key") == "loram"), None)
        original = next((r for r in m.verification.get("rows", []) if r.get("key") == "original"), None)
        if loram and original:
            rows.append(("verified", f"task loss on the original {original['loss']:.3f}, with the recovered "
                                     f"LoRA {loram['loss']:.3f}"))  # fmt: skip
    rows.append(("get it", f"loram pull {consumer_uri(uri)} ./{m.name}-{m.version}"))
    return rows


def print_version(console: Console, manifest, uri: str) -> None:
    """`loram inspect`'s summary, one row a line (`--json` prints the manifest instead).

    Never wrapped nor clipped at the terminal's width: a URI or the pull command stays whole, to copy.
    """
    rows = version_lines(manifest, uri)
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        console.print(f"{label:<{width}}  {text}", highlight=False, markup=False, soft_wrap=True)
