"""PNG plots of bench results (matplotlib, Agg): speedup vs ideal, efficiency, decode latency."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {"dense": dict(color="black", ls=":"), "naive": dict(color="tab:gray", ls="--"),
          "sorted": dict(color="tab:brown", ls="--"), "reference": dict(color="tab:pink", ls="--"),
          "torch": dict(color="tab:blue"), "triton": dict(color="tab:red"),
          "cuda": dict(color="tab:green")}


def _style(name: str) -> Dict:
    return dict(marker="o", ms=3, **_STYLE.get(name, {}))


def _grid(n: int):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _ok(r: Dict) -> bool:
    return r.get("median_ms") is not None and not r.get("error")


def speedup_plots(rows: List[Dict], env: Dict, out_dir: str, prefix: str) -> List[str]:
    """Per shape: realised vs ideal speedup per mix, and efficiency vs token count."""
    paths = []
    by_shape = defaultdict(list)
    for r in rows:
        if _ok(r):
            by_shape[r["shape"]].append(r)
    for shape, rs in by_shape.items():
        mixes = list(dict.fromkeys(r["mix"] for r in rs))
        impls = [i for i in dict.fromkeys(r["impl"] for r in rs) if i != "dense"]
        for what in ("speedup", "efficiency"):
            fig, axes = _grid(len(mixes))
            for ax, mix in zip(axes, mixes):
                mr = [r for r in rs if r["mix"] == mix]
                if what == "speedup":
                    ideal = sorted({(r["n_tokens"], r["ideal"]) for r in mr
                                    if r["impl"] != "dense"})
                    ax.plot([n for n, _ in ideal], [v for _, v in ideal], color="black",
                            lw=2, alpha=.35, label="ideal (FLOPs)")
                for impl in impls:
                    pts = sorted((r["n_tokens"], r["realised" if what == "speedup"
                                                   else "efficiency"])
                                 for r in mr if r["impl"] == impl)
                    if pts:
                        ax.plot(*zip(*pts), label=impl, **_style(impl))
                ax.set_xscale("log", base=2)
                if what == "speedup":
                    ax.set_yscale("log")
                    ax.axhline(1, color="black", lw=.5)
                else:
                    ax.axhline(1, color="black", lw=.5)
                    ax.set_ylim(bottom=0)
                ax.set_title(mix, fontsize=9)
                ax.set_xlabel("tokens")
                ax.set_ylabel("realised speedup vs dense" if what == "speedup"
                              else "efficiency (realised / ideal)")
                ax.grid(alpha=.3)
            axes[0].legend(fontsize=7)
            sh = rs[0]
            fig.suptitle(f"{what}: {env['device']}, {env['dtype']}, shape {shape} "
                         f"(d {sh['d_model']}, big {sh['d_big']}, small {sh['d_small']})",
                         fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{prefix}-{shape}-{what}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def decode_plots(rows: List[Dict], env: Dict, out_dir: str, prefix: str) -> List[str]:
    """Per level (layer, model): latency vs tokens, one line per (impl, mix, mode)."""
    paths = []
    for level in dict.fromkeys(r["level"] for r in rows):
        rs = [r for r in rows if r["level"] == level and _ok(r)]
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        keys = list(dict.fromkeys((r["impl"], r["mix"], r["mode"]) for r in rs))
        mixes = list(dict.fromkeys(r["mix"] for r in rs))
        for impl, mix, mode in keys:
            pts = sorted((r["n_tokens"], r["median_ms"] * 1e3) for r in rs
                         if (r["impl"], r["mix"], r["mode"]) == (impl, mix, mode))
            st = _style(impl)
            st["marker"] = "osD^v<>"[mixes.index(mix) % 7]  # marker: mix; colour: impl
            if mode == "graph":
                st["ls"] = "-."
            ax.plot(*zip(*pts), label=f"{impl} {mix} {mode}", **st)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step")
        ax.set_ylabel("latency (us)")
        ax.grid(alpha=.3)
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"decode {level}: {env['device']}, {env['dtype']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}-{level}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def model_plots(rows: List[Dict], env: Dict, out_dir: str, prefix: str) -> List[str]:
    """Tokens/s per mix and backend, forward and training step."""
    rs = [r for r in rows if _ok(r) and r.get("tokens_per_s")]
    if not rs:
        return []
    phases = list(dict.fromkeys(r["phase"] for r in rs))
    fig, axes = _grid(len(phases))
    for ax, phase in zip(axes, phases):
        pr = [r for r in rs if r["phase"] == phase]
        mixes = list(dict.fromkeys(r["mix"] for r in pr))
        impls = list(dict.fromkeys(r["impl"] for r in pr))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            vals = [next((r["tokens_per_s"] for r in pr if r["mix"] == m and r["impl"] == impl),
                         0) for m in mixes]
            ax.bar([i + j * width for i in range(len(mixes))], vals, width, label=impl,
                   color=_STYLE.get(impl, {}).get("color"))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mixes))])
        ax.set_xticklabels(mixes, fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title(phase, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"model throughput: {env['device']}, {env['dtype']}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


_FRONTIER_STYLE = {"dense": dict(marker="*", ms=11, color="black"),
                   "policy": dict(marker="s", ms=6, color="tab:gray"),
                   "fixed": dict(marker="o", ms=5, color="tab:blue"),
                   "random": dict(marker="^", ms=5, color="tab:orange"),
                   "router": dict(marker="D", ms=6, color="tab:red")}


def frontier_plot(rows: List[Dict], env: Dict, out_dir: str, prefix: str) -> str:
    """``duollm bench frontier``: held-out loss against tokens/s, one panel per timed setting
    (prefill / decode at batch 1 and 8), the Pareto front of the deployable routings drawn,
    dense models as stars, the oracle's losses as dotted lines (a bound: not deployable)."""
    settings = [("prefill", 1), ("prefill", 8), ("decode", 1), ("decode", 8)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.2))
    oracle = [r for r in rows if r["kind"] == "oracle"]
    for ax, (phase, batch) in zip(axes.flat, settings):
        key = f"{phase}_b{batch}"
        live = [r for r in rows if r["kind"] != "oracle" and r.get(f"{key}_tps")
                and not math.isnan(r[f"{key}_tps"])]
        for kind, st in _FRONTIER_STYLE.items():
            pts = [r for r in live if r["kind"] == kind]
            if pts:
                ax.plot([r[f"{key}_tps"] for r in pts], [r["loss"] for r in pts], ls="none",
                        label=kind, **st)
        for r in live:
            if r["kind"] in ("dense", "policy", "router"):
                ax.annotate(r["routing"], (r[f"{key}_tps"], r["loss"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        front = sorted((r[f"{key}_tps"], r["loss"]) for r in live if r.get(f"{key}_front"))
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="tab:green", lw=1.2, alpha=.8,
                    label="Pareto front")
        for r in oracle:
            ax.axhline(r["loss"], color="tab:purple", ls=":", lw=.8)
        if oracle:
            ax.plot([], [], color="tab:purple", ls=":", lw=.8,
                    label="oracle k=1..L-1 (bound, not deployable)")
        # Linear: the speeds of one setting span a few x at most, and log minor labels collide.
        ax.set_xlim(left=0)
        ax.set_xlabel("tokens / s")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title(f"{phase}, batch {batch}", fontsize=9)
        ax.grid(alpha=.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"quality vs speed: {env['device']}, {env['dtype']}, {env.get('model', '')}",
                 fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_HF_COLORS = {"original": "black", "ideal": "tab:gray", "converted": "tab:purple",
              "big": "tab:blue", "small": "tab:green", "1/12": "tab:orange"}


def hf_plot(rows: List[Dict], env: Dict, out_dir: str, prefix: str) -> List[str]:
    """``duollm bench hf``: tokens/s of every candidate (original, ideal, converted and each
    routing, per backend), one panel per phase (prefill, decode); ``<prefix>.png``."""
    rs = [r for r in rows if _ok(r) and r.get("tokens_per_s")
          and math.isfinite(r["tokens_per_s"])]
    if not rs:
        return []
    phases = list(dict.fromkeys(r["phase"] for r in rs))
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 3.8), squeeze=False)
    for ax, phase in zip(axes.flat, phases):
        pr = [r for r in rs if r["phase"] == phase]
        labels = [r["impl"] + ("" if r["backend"] in ("-", "default") else f"\n[{r['backend']}]")
                  for r in pr]
        ax.bar(range(len(pr)), [r["tokens_per_s"] for r in pr],
               color=[_HF_COLORS.get(r["impl"], "tab:cyan") for r in pr])
        for i, r in enumerate(pr):
            if r["impl"] not in ("original", "ideal") and math.isfinite(r["vs_original"]):
                ax.text(i, r["tokens_per_s"], f"{r['vs_original']:.2f}x", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(range(len(pr)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("tokens / s")
        what = (f"batch {pr[0]['batch']} x {pr[0]['tokens']} tokens" if phase == "prefill"
                else f"{pr[0]['tokens']} new tokens, batch {pr[0]['batch']}")
        ax.set_title(f"{phase} ({what})", fontsize=9)
    model = env.get("checkpoint") or f"random {env.get('family')}"
    fig.suptitle(f"bench hf: {model}, {env.get('n_layers')} layers, d_model "
                 f"{env.get('d_model')}, d_big {env.get('d_big')}, d_small {env.get('d_small')}"
                 f"; {env['device']}, {env['dtype']} (labels: speed vs the original)",
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
