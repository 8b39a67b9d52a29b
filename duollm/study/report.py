"""The study's report: PNG plots (matplotlib, Agg) and ``report.md``, read from a typed
``StudyResult`` (nothing here is a template number; a renamed field fails loudly)."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

from .results import HoldoutResult, StudyResult
from .stats import Interval, Verdict

# per-holdout plots: figure of the paper -> file stem
FIGURES = {
    "fig4b": "loss_vs_k", "fig4a": "oracle_vs_random_vs_router", "fig2": "capacity",
    "fig2d": "skip_profile", "fig4c": "position_budget", "fig3": "usage_by_position",
    "fig6": "difficulty_text", "fig5": "difficulty_scatter", "fig7": "routing_map",
}
SYNTHETIC_PLOT = "synthetic_difficulty.png"
_ROUTE_COLOURS = ("white", "tab:blue", "tab:red")  # skip, small, big (the paper's Figure 7)


def plot_names(holdouts: List[str], synthetic: bool = False) -> List[str]:
    """Every PNG the report writes for these holdout names."""
    names = [f"{fig}_{stem}_{h}.png" for h in holdouts for fig, stem in FIGURES.items()]
    return names + ([SYNTHETIC_PLOT] if synthetic else [])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _err(iv: Interval):
    return [[iv.estimate - iv.low], [iv.high - iv.estimate]]


def _plot_loss_vs_k(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for c in h.curves:
        ks = [k for k, p in enumerate(c.points) if p is not None]
        style = "*" if c.name == "router" else "o-"
        ms = 10 if c.name == "router" else 4
        a1.plot(ks, [c.points[k].estimate for k in ks], style, ms=ms, label=c.label)
        d = [c.vs_all_big[k] for k in ks]
        a2.errorbar(ks, [x.estimate for x in d], yerr=[[x.estimate - x.low for x in d],
                                                      [x.high - x.estimate for x in d]],
                    fmt=style, ms=ms, capsize=3, label=c.label)
    a1.axhline(h.all_big.estimate, color="gray", ls=":", label="all big")
    a1.axhline(h.all_small.estimate, color="gray", ls="--", label="all small")
    a2.axhline(0, color="gray", ls=":")
    for ax in (a1, a2):
        ax.set_xlabel("big layers per token (k)")
        ax.grid(alpha=0.3)
    a1.set_ylabel("loss (nats/token), evaluation split")
    a2.set_ylabel("loss minus all-big loss (paired, 95% interval)")
    a1.legend(fontsize=6)
    fig.suptitle(f"Figure 4b, {h.name}: loss vs big layers per token", fontsize=10)
    _save(fig, path)


def _plot_fig4a(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    k = h.headline_k
    rk = _router_k(h)
    bars = [(f"oracle k={k}", _curve(h, "oracle").points[k]),
            (f"best random k={k}", _curve(h, "random").points[k]),
            (f"best fixed k={k}", _curve(h, "fixed").points[k])]
    r = _curve(h, "router").points[rk]
    if r is not None:
        bars.append((f"router k={rk}", r))
    bars.append(("all big", h.all_big))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (lab, iv) in enumerate(bars):
        ax.bar(i, iv.estimate, yerr=_err(iv), capsize=4)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    lo = min(b[1].low for b in bars)
    hi = max(b[1].high for b in bars)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Figure 4a, {h.name}: oracle vs best of N random vs router", fontsize=10)
    _save(fig, path)


def _plot_capacity(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    c = h.capacity
    fig, axes = plt.subplots(1, len(c.budgets), figsize=(4.2 * len(c.budgets), 3.6),
                             squeeze=False)
    for ax, k in zip(axes[0], c.budgets):
        ivs = c.oracle_big_by_layer[k]
        L = len(ivs)
        ax.bar([i - 0.2 for i in range(L)], [v.estimate for v in ivs], width=0.4,
               yerr=[[v.estimate - v.low for v in ivs], [v.high - v.estimate for v in ivs]],
               capsize=2, label="oracle")
        if k in c.router_big_by_layer:
            ax.bar([i + 0.2 for i in range(L)], c.router_big_by_layer[k], width=0.4,
                   label="router")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of tokens big")
        ax.set_title(f"k = {k} of {L}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Figures 2a-c / 3a-c, {h.name}: big usage per layer", fontsize=10)
    _save(fig, path)


def _plot_skip(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    s = h.skip
    L = len(s.big_or_skip_skip_by_layer)
    series = [("oracle, big or skip", s.big_or_skip_skip_by_layer)]
    if s.full_skip_by_layer is not None:
        series.append(("oracle, 3^L", s.full_skip_by_layer))
    if s.router_skip_by_layer is not None:
        series.append(("router with a skip path", s.router_skip_by_layer))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    w = 0.8 / len(series)
    for j, (lab, v) in enumerate(series):
        ax.bar([i + (j - (len(series) - 1) / 2) * w for i in range(L)], v, width=w, label=lab)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens skipping")
    ax.set_title(f"Figures 2d / 3d, {h.name}: skip profile ({s.big_or_skip_k} big per token)",
                 fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_position_budget(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    p = h.position_budget
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    n = len(next(iter(p.schedules.values())))
    a1.plot(range(n), [p.constant_k] * n, label="constant")
    for name, ks in p.schedules.items():
        a1.plot(range(n), ks, label=name)
    a1.set_xlabel("token position")
    a1.set_ylabel("big layers allowed")
    a1.legend(fontsize=7)
    names = list(p.loss)
    for i, name in enumerate(names):
        a2.bar(i, p.loss[name].estimate, yerr=_err(p.loss[name]), capsize=4)
    a2.set_xticks(range(len(names)), names)
    lo = min(v.low for v in p.loss.values())
    hi = max(v.high for v in p.loss.values())
    a2.set_ylim(lo - 0.2 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3))
    a2.set_ylabel("oracle loss (nats/token)")
    fig.suptitle(f"Figure 4c, {h.name}: position-varying budget, same mean", fontsize=10)
    _save(fig, path)


def _smooth(v: List[float], n_bins: int = 16):
    n = len(v)
    n_bins = max(1, min(n_bins, n))
    xs, ys = [], []
    for b in range(n_bins):
        lo, hi = b * n // n_bins, (b + 1) * n // n_bins
        if hi > lo:
            xs.append((lo + hi - 1) / 2)
            ys.append(sum(v[lo:hi]) / (hi - lo))
    return xs, ys


def _plot_usage_position(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs, ys = _smooth(h.oracle_big_by_position)
    ax.plot(xs, ys, "--", marker=".", label=f"oracle, at most {h.headline_k} big")
    for r in h.routers:
        xs, ys = _smooth(r.big_by_position)
        ax.plot(xs, ys, "-", marker=".", label=f"router {r.name} ({r.paths})")
    ax.set_xlabel("token position")
    ax.set_ylabel("fraction of layers big")
    ax.set_ylim(0, 1)
    ax.set_title(f"Figure 3 (by position), {h.name}: big usage along the sequence",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _render_text(ax, tokens: List[int], values: List[float], title: str, cmap) -> None:
    """Byte tokens as characters on a grid, each coloured by ``values`` (position t's value
    belongs to the token it predicts, ``tokens[t + 1]``)."""
    import matplotlib.colors as mcolors

    chars = [chr(t) if 32 <= t < 127 else ("\u21b5" if t == 10 else "\u00b7")
             for t in tokens[1:]]
    finite = [v for v in values if not math.isnan(v)]
    norm = mcolors.Normalize(vmin=min(finite, default=0), vmax=max(finite, default=1))
    width = 48
    rows = (len(chars) + width - 1) // width
    for i, (c, v) in enumerate(zip(chars, values)):
        x, y = i % width, rows - 1 - i // width
        ax.add_patch(_plt().Rectangle((x, y), 1, 1, color=cmap(norm(v))))
        ax.text(x + 0.5, y + 0.5, c, ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(0, rows)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


def _plot_difficulty_text(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    d = h.difficulty
    cmap = plt.get_cmap("coolwarm")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 4.8))
    _render_text(a1, d.snippet_tokens, d.snippet_loss_small,
                 f"(a) {h.name}: loss with every layer small (red = high)", cmap)
    _render_text(a2, d.snippet_tokens, d.snippet_gain,
                 f"(b) {h.name}: gain = loss(all small) - oracle loss (red = gains most)", cmap)
    fig.suptitle(f"Figures 5/6, {h.name}: token difficulty on text", fontsize=10)
    _save(fig, path)


def _plot_difficulty_scatter(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    d = h.difficulty
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(d.points_loss_small, d.points_gain, s=4, alpha=0.4)
    ax.set_xlabel("loss with every layer small")
    ax.set_ylabel("gain: loss(all small) - oracle")
    ax.set_title(f"{h.name}: difficulty vs gain (Spearman {d.spearman.estimate:.2f}, top-"
                 f"quartile overlap {d.overlap.estimate:.2f})", fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_routing_map(h: HoldoutResult, path: str) -> None:
    plt = _plt()
    from matplotlib.colors import ListedColormap

    names = list(h.routing_map)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.0 + 0.9 * len(names)),
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        m = h.routing_map[name]
        ax.imshow(m, aspect="auto", cmap=ListedColormap(_ROUTE_COLOURS), vmin=0, vmax=2,
                  interpolation="nearest")
        r = next(x for x in h.routers if x.name == name)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_title(f"router {name}: big {r.realised_big:.0%}, small {r.realised_small:.0%}, "
                     f"skip {r.realised_skip:.0%} (red big, blue small, white skip)",
                     fontsize=8)
    axes[-1, 0].set_xlabel("token position")
    fig.suptitle(f"Figure 7, {h.name}: one sequence's routes", fontsize=10)
    _save(fig, path)


def _plot_synthetic(res: StudyResult, path: str) -> None:
    plt = _plt()
    bk = res.synthetic.difficulty.by_kind or {}
    names = list(bk)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([i - 0.2 for i in range(len(names))], [bk[n]["loss_small"] for n in names],
           width=0.4, label="loss, all small")
    ax.bar([i + 0.2 for i in range(len(names))], [bk[n]["gain"] for n in names], width=0.4,
           label="gain from the oracle")
    ax.set_xticks(range(len(names)), names)
    ax.set_title("Synthetic corpus: difficulty by known token kind", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


_MAKERS = {"fig4b": _plot_loss_vs_k, "fig4a": _plot_fig4a, "fig2": _plot_capacity,
           "fig2d": _plot_skip, "fig4c": _plot_position_budget, "fig3": _plot_usage_position,
           "fig6": _plot_difficulty_text, "fig5": _plot_difficulty_scatter,
           "fig7": _plot_routing_map}


# --------------------------------------------------------------------------- text


def _curve(h: HoldoutResult, name: str):
    return next(c for c in h.curves if c.name == name)


def _router_k(h: HoldoutResult) -> int:
    ks = [k for k, p in enumerate(_curve(h, "router").points) if p is not None]
    return min(ks, key=lambda k: abs(k - h.headline_k)) if ks else h.headline_k


def _iv(iv: Optional[Interval], nd: int = 3) -> str:
    """``estimate [low, high]`` with at least ``nd`` decimals and as many more as keep every
    nonzero number's first two significant digits (a bound of 0.00034 is not "0.000")."""
    from .verdicts import fmt

    return fmt(iv, nd, zero=False)


def _verdict_row(where: str, v: Verdict) -> str:
    return f"| {where} | {v.claim} | {v.criterion} | {_iv(v.interval)} | **{v.outcome}** |"


def verdicts(res: StudyResult) -> List[tuple]:
    """(figure, holdout, Verdict) for every verdict of the study."""
    out = []
    for h in res.holdouts:
        out += [("4a", h.name, h.oracle_vs_random), ("4b", h.name, h.one_big_beats_all_big),
                ("4a", h.name, h.router_near_random), ("2a-c", h.name, h.capacity.verdict),
                ("3a-c", h.name, h.capacity.router_verdict), ("2d", h.name, h.skip.verdict_oracle)]
        if h.skip.verdict_router is not None:
            out.append(("3d", h.name, h.skip.verdict_router))
        out += [("4c", h.name, h.position_budget.verdict), ("5/6", h.name, h.difficulty.verdict)]
    if res.synthetic is not None:
        out.append(("5/6", "synthetic", res.synthetic.verdict))
    return out


def summary_text(res: StudyResult) -> str:
    """The verdicts and headline numbers as plain text (printed by ``duollm study``)."""
    lines = []
    for h in res.holdouts:
        lines.append(f"{h.name}: all big {_iv(h.all_big)}, all small {_iv(h.all_small)}; "
                     f"oracle-tok (k={h.headline_k}) "
                     f"{_iv(_curve(h, 'oracle').points[h.headline_k])}")
    if res.verdicts:
        from .verdicts import summary_lines

        lines += summary_lines(res.verdicts)
    else:
        for fig, where, v in verdicts(res):
            lines.append(f"Fig {fig:<5} {where:<9} {v.outcome:<14} {v.claim}: "
                         f"{_iv(v.interval)}")
    lines.append("time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in res.timings.items()))
    return "\n".join(lines)


def write_report(res: StudyResult, out_dir: str) -> List[str]:
    """Write every plot of ``plot_names`` and ``report.md`` into ``out_dir``; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for h in res.holdouts:
        for fig, stem in FIGURES.items():
            p = os.path.join(out_dir, f"{fig}_{stem}_{h.name}.png")
            _MAKERS[fig](h, p)
            paths.append(p)
    if res.synthetic is not None:
        p = os.path.join(out_dir, SYNTHETIC_PLOT)
        _plot_synthetic(res, p)
        paths.append(p)
    p = os.path.join(out_dir, "report.md")
    with open(p, "w") as f:
        f.write(markdown(res))
    return paths + [p]


def _img(fig: str, h: HoldoutResult, alt: str) -> str:
    return f"![{alt}, {h.name}]({fig}_{FIGURES[fig]}_{h.name}.png)"


def markdown(res: StudyResult) -> str:
    """``report.md``."""
    cfg = res.config
    L = cfg["n_layers"]
    out = [f"# Duo-LLM study: {res.name}", ""]
    saved = ("; the trained model is saved in `model/`, loaded by duollm.hf.load_converted"
             if res.steps and res.preset == "hf" else "")
    trained = (f"trained {res.steps} steps with random routing (skip/small/big probabilities "
               f"{res.train_probs}) on `{res.data}`" if res.source == "duollm"
               else f"the DuoLLM checkpoint `{res.source[len('checkpoint:'):]}` (step "
                    f"{res.steps})" if res.source.startswith("checkpoint:")
               else f"converted Hugging Face checkpoint `{res.source}` ({res.steps} small-FFN "
                    f"training steps{saved})")
    # An HF run names the checkpoint's model class (its config holds it), not "hf".
    model_name = cfg.get("model_class", res.preset) if res.preset == "hf" else res.preset
    losses_of = "after training" if res.steps else "of the loaded model (no training)"
    out.append(f"Model `{model_name}`: {L} layers, d_model {cfg['d_model']}, big FFN "
               f"{cfg['d_big']}, small FFN {cfg['d_small']}; {trained}; device {res.device}, "
               f"seed {res.seed}. Validation loss {losses_of}: "
               + (", ".join(f"{k} {v:.4f}" for k, v in res.train_val_loss.items()) or "-")
               + ".")
    out.append("")
    out.append("Holdouts: " + "; ".join(
        f"**{h.name}** ({h.source}): {h.n_sequences} sequences of {h.seq_len} tokens, "
        f"{h.n_selection} to select baselines and router thresholds, {h.n_evaluation} to "
        f"evaluate" for h in res.holdouts) + ".")
    out += ["", "Every number below is on the evaluation sequences of its holdout, with a "
            "bootstrap 95% interval over those sequences in brackets (the verdicts' own rules, "
            "Holm correction and null control are in their section). Losses are next-token "
            "cross-entropy in nats.", "",
            "## The oracles and what they bound", "",
            "- **Oracle (the paper's, `base='pattern'`)**: every layer pattern runs over the "
            "whole sequence, and each token takes the pattern with the lowest loss on that "
            "token. It is a lower bound on any routing that gives each token one pattern *and* "
            "runs the whole sequence with that pattern; it uses the token's label, so no "
            "deployable router reaches it. It does not bound a routing in which a token's "
            "context is routed differently from its own path (tokens routed individually).",
            "- **Token oracle with context all big (`base='big'`)**: only the scored token's "
            "own path changes, every earlier token is all big. It bounds per-token routing "
            "*given* a full-compute context, i.e. it answers how much a token's own layers "
            "matter; it is not realisable by running all tokens with their routes at once "
            "(then the context is no longer all big). `base='small'` (a small context) is "
            "the same question at the other end.",
            "- **Best fixed pattern / best of N random patterns**: one pattern for every "
            "token, chosen on the selection split, scored on the evaluation split.", ""]
    out += _verdicts_md(res)
    for h in res.holdouts:
        out += _holdout_md(res, h)
    if res.synthetic is not None:
        out += _synthetic_md(res)
    out += ["", "## Run time", "",
            ", ".join(f"{k[:-2]}: {v:.1f} s" for k, v in res.timings.items()), ""]
    return "\n".join(out)


def _verdicts_md(res: StudyResult) -> List[str]:
    """The verdict family (``verdicts.json``): settings, parts, null control, Holm."""
    from .verdicts import (ALPHA, BIG_SMALL_MARGIN, SKIP_EQUIV_MARGIN, SPEARMAN_MAX,
                           markdown_table)

    if not res.verdicts:  # a result from before the verdict family
        return (["## Verdicts", "", "| figure, holdout | claim of the paper | criterion | "
                 "estimate [95% CI] | verdict |", "|---|---|---|---|---|"]
                + [_verdict_row(f"{fig}, {where}", v) for fig, where, v in verdicts(res)])
    seeds = res.seeds or [res.seed]
    n_fam = len(res.verdicts)
    out = ["## Verdicts", "",
           f"The family: the {n_fam} verdicts below (every claim on every holdout, and the "
           f"synthetic check), Holm-corrected together at {ALPHA}. "
           f"{len(seeds)} training seed(s) {seeds}"
           + ("; every interval is a hierarchical bootstrap (seeds, then sequences within "
              "each seed)" if len(seeds) > 1 else
              "; intervals cover sequences only (one seed: seed-to-seed variation is not in "
              "them)") + ". A verdict **holds** / **does not hold** when every part's 95% "
           "interval excludes zero on the claimed / other side and its Holm p is below "
           f"{ALPHA}; **not resolved** otherwise; **not testable** when its precondition "
           "fails (the measured reason follows). Constants fixed in code before any data: "
           f"2d's equivalence margin {SKIP_EQUIV_MARGIN}, 5/6's Spearman bound "
           f"{SPEARMAN_MAX}, the all-small minus all-big margin {BIG_SMALL_MARGIN} nats that a "
           f"claim needing big != small requires.", ""]
    if res.null_control:
        out += ["**Null control** (`--null-control`): every verdict is also measured on the "
                "null model (`duollm.study.null.null_model`: each big FFN replaced by the "
                "small FFN zero-padded to d_big, so big == small exactly; its routers trained "
                "like the real model's) over the same sequences. *null model* is its "
                "estimate, *real minus null* the interval of the difference, paired over "
                "sequences. A claim that needs big != small and holds on the real model but "
                "whose difference does not exclude zero on the claimed side is **not "
                "distinguishable from selection**. In the null model every big/small pattern "
                "ties, so for claims about big/small patterns its estimate is zero (no "
                "selection among ties); selection among skip patterns remains.", ""]
    else:
        out += ["No null model in this run (`--null-control` adds it).", ""]
    relabel = any("n_relabel" in v for v in res.verdicts)  # results from before it: none
    if relabel:
        from .verdicts import RELABEL_P

        out += ["**Two controls for selection.** The *null model* (`--null-control`) makes "
                "big == small, so its big/small patterns tie and there is no selection among "
                "them: it catches what the analysis does without the big FFN (skip patterns, "
                "routers, the criterion), not the oracle's minimum over noisy candidates. The "
                f"*relabelled table* (every run, no extra model runs) keeps that selection: "
                f"{RELABEL_P} copies of each seed's table whose big/small labels are shuffled "
                "among the patterns that skip the same layers, so the candidates' losses "
                "spread exactly as on the real table but \"big\" carries no effect. *relabelled "
                "null* is the mean over the copies, *real minus relabelled* its paired interval "
                "(sequences shared, copies resampled). A claim that needs big != small holds "
                "only when, for every part, real minus each control excludes zero on the "
                "claimed side; otherwise it is **not distinguishable from selection**, and the "
                "reason names the part. It applies to the claims read from the pattern table "
                "(4a, 4b, 2a-c, 4c, 5/6), not to those about routers or skipping (`-`).", ""]
    return out + markdown_table(res.verdicts, res.null_control, relabel)


def _holdout_md(res: StudyResult, h: HoldoutResult) -> List[str]:
    L = res.config["n_layers"]
    out = ["", f"## Holdout: {h.name}", "",
           f"All big {_iv(h.all_big)}, all small {_iv(h.all_small)}.", "",
           "### Figure 4a/4b: loss vs big layers", "", _img("fig4b", h, "loss vs k"), "",
           _img("fig4a", h, "oracle vs random vs router"), ""]
    head = ["k"] + [c.label for c in h.curves]
    out += ["Loss (the intervals include the spread between sequences):", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in range(L + 1):
        out.append(f"| {k} | " + " | ".join(_iv(c.points[k]) for c in h.curves) + " |")
    out += ["", "Loss minus all-big loss on the same sequences (paired; below zero: better "
            "than all big):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in range(L + 1):
        out.append(f"| {k} | " + " | ".join(_iv(c.vs_all_big[k]) for c in h.curves) + " |")
    fixed, rnd = _curve(h, "fixed"), _curve(h, "random")
    out += ["", "Chosen patterns (0 skip, 1 small, 2 big; layer 0 first): " + "; ".join(
        f"k={k} fixed {fixed.patterns[k]}, random {rnd.patterns[k]}" for k in
        range(1, L)) + ". With few layers the 100 random draws cover most of the C(L, k) "
        "patterns, so the best random pattern is often the best fixed pattern.", ""]
    out.append(f"At k={_router_k(h)}: router minus oracle "
               f"{_iv(h.router_vs['router_minus_oracle'])}, router minus best random "
               f"{_iv(h.router_vs['router_minus_random'])}.")
    out += ["", "| router | paths | budget | threshold | loss | big | small | skip | "
            "objective first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for r in h.routers:
        thr = "argmax" if r.threshold is None else f"{r.threshold:.3f}"
        budget = (f"compute {r.target_compute:.2f}" if r.target_compute is not None
                  else f"big {r.target_big:.3f}")
        out.append(f"| {r.name} | {r.paths} | {budget} | {thr} | {_iv(r.loss)} | "
                   f"{r.realised_big:.3f} | {r.realised_small:.3f} | {r.realised_skip:.3f} | "
                   f"{r.objective_first:.3f} -> {r.objective_last:.3f} |")
    out += ["", f"Approximate searches of the oracle against the exhaustive one (exactly "
            f"{h.headline_k} big layers, evaluation split; gap: approximate minus exhaustive, "
            f"paired over sequences, never below zero):", "",
            "| search | loss | gap | positions at the exhaustive loss | seconds |",
            "|---|---|---|---|---|"]
    for g in h.approx_gaps:
        name = "greedy" if g.method == "greedy" else f"beam (width {g.beam_width})"
        out.append(f"| {name} | {_iv(g.loss)} | {_iv(g.gap, 4)} | {g.exact_share:.3f} | "
                   f"{g.seconds:.2f} |")
    c = h.capacity
    out += ["", "### Figures 2a-c and 3a-c: capacity threshold", "",
            _img("fig2", h, "big usage per layer"), "",
            "| k | oracle big usage per layer | later minus earlier half | router per layer |",
            "|---|---|---|---|"]
    for k in c.budgets:
        out.append(f"| {k} | " + ", ".join(f"{v.estimate:.2f}" for v in
                                          c.oracle_big_by_layer[k])
                   + f" | {_iv(c.late_minus_early[k])} | "
                   + (", ".join(f"{v:.2f}" for v in c.router_big_by_layer[k])
                      if k in c.router_big_by_layer else "-") + " |")
    s = h.skip
    out += ["", "### Figures 2d and 3d: skipping", "", _img("fig2d", h, "skip profile"), "",
            f"Big-or-skip oracle ({s.big_or_skip_k} big, the rest skipped): "
            f"{_iv(s.big_or_skip_loss)}; 3^L oracle ({s.big_or_skip_k} big, the rest small or "
            f"skip): {_iv(s.full_loss)}. Share of tokens whose skips are a suffix of the layers "
            f"(an early exit): " + ", ".join(
                f"{k} {'n/a' if v is None or math.isnan(v) else f'{v:.2f}'}"
                for k, v in s.suffix_share.items()) + "."]
    p = h.position_budget
    out += ["", "### Figure 4c: position-varying budget", "",
            _img("fig4c", h, "position budget"), "",
            f"Constant {p.constant_k} big per token vs schedules from "
            f"{p.schedules['decreasing'][0]} to {p.schedules['decreasing'][-1]} (mean "
            f"{sum(p.schedules['decreasing']) / len(p.schedules['decreasing']):.2f}): "
            + ", ".join(f"{k} {_iv(v)}" for k, v in p.loss.items()) + "."]
    d = h.difficulty
    out += ["", "### Figures 3, 5, 6, 7: usage by position, token difficulty, routing map", "",
            _img("fig3", h, "usage by position"), "", _img("fig6", h, "difficulty on text"),
            "", _img("fig5", h, "difficulty scatter"), "", _img("fig7", h, "routing map"), "",
            f"Over {d.n_tokens} evaluation tokens: Spearman(loss all small, gain) "
            f"{_iv(d.spearman)}; top-quartile overlap {_iv(d.overlap)} (chance 0.25, identical "
            f"rankings 1); high-loss tokens with below-median gain {_iv(d.high_loss_low_gain)}; "
            f"bottom-half-loss tokens in the top gain quartile {_iv(d.low_loss_high_gain)}."]
    return out + _by_kind_table(d.by_kind)


def _by_kind_table(by_kind: Optional[Dict[str, Dict[str, float]]]) -> List[str]:
    """Markdown lines of the per-known-kind table (none when the corpus has no kinds)."""
    if not by_kind:
        return []
    return ["", "| known kind | tokens | loss all small | gain |", "|---|---|---|---|"] + [
        f"| {n} | {v['n']} | {v['loss_small']:.3f} | {v['gain']:.3f} |"
        for n, v in by_kind.items()]


def _synthetic_md(res: StudyResult) -> List[str]:
    s = res.synthetic
    d = s.difficulty
    from .verdicts import fmt

    known = "memory" if s.task == "memory" else "copy/compute"
    corpus = ("a key -> value table: value letters follow only from the table stored in the "
              "weights, so their answer lives in the FFN; noise letters cannot be predicted"
              if s.task == "memory" else
              "noise spans cannot be predicted; copied spans and running sums can")
    out = ["", "## The difficulty criterion on the synthetic corpus (known answer)", "",
           f"![synthetic]({SYNTHETIC_PLOT})", "",
           f"A `{s.preset}` model trained {s.steps} steps on the synthetic corpus ({corpus}); "
           f"{s.setting}; every number on its {s.n_sequences} evaluation sequences. "
           f"Precondition (does the model learn it?): {known} tokens' loss with every layer "
           f"big {fmt(s.precondition, zero=False)} nats, against log(26)/2 = 1.629 (a "
           f"uniform guess is log 26 = 3.258). Noise minus {known} small-model loss "
           f"{fmt(s.noise_minus_rest_loss)}; {known} minus noise gain "
           f"{fmt(s.rest_minus_noise_gain)}; rank overlap {_iv(d.overlap)}, Spearman "
           f"{_iv(d.spearman)}. Verdict: **{s.verdict.outcome}**"
           + (f" ({s.reason})" if s.reason else "") + "."]
    return out + _by_kind_table(d.by_kind)
