"""The study's report: PNG plots (matplotlib, Agg) and ``report.md``, all from the results dict
that ``duollm.study.run_study`` measured (nothing here is a template number)."""
from __future__ import annotations

import math
import os
from typing import Dict, List

PLOTS = ("loss_vs_budget.png", "usage_per_layer.png", "usage_by_position.png",
         "difficulty_vs_loss.png", "agreement.png", "router_training.png")

_CURVE_LABELS = {
    "oracle_token_exactly": "oracle, token, exactly k (context big)",
    "oracle_token_at_most": "oracle, token, at most k (context big)",
    "oracle_sequence_exactly": "oracle, sequence, exactly k",
    "oracle_sequence_at_most": "oracle, sequence, at most k",
    "first_k": "first k layers big",
    "last_k": "last k layers big",
    "best_random_pattern": "best of N random patterns",
    "random_per_token": "random per token",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_loss(res: Dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    ks = res["ks"]
    for name, ys in res["curves"].items():
        style = "-" if name.startswith("oracle") else "--"
        ax.plot(ks, ys, style, marker="o", ms=3, label=_CURVE_LABELS.get(name, name))
    L = res["n_layers"]
    for k, e in res["routers"].items():
        ax.plot([e["realised"] * L], [e["loss"]], "k*", ms=12)
        ax.plot([e["supervised_realised"] * L], [e["supervised_loss"]], "rP", ms=10)
    ax.plot([], [], "k*", label="trained router (realised budget)")
    ax.plot([], [], "rP", label="oracle-imitation router")
    ax.set_xlabel("big layers per token (k, or realised fraction x L)")
    ax.set_ylabel("validation loss (nats/token)")
    sec = ax.secondary_yaxis("right", functions=(lambda x: _exp(x), lambda p: _log(p)))
    sec.set_ylabel("perplexity")
    ax.set_title(f"Loss vs compute budget ({res['preset']}, {res['data']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exp(x):
    import numpy as np

    return np.exp(np.clip(x, -50, 50))


def _log(p):
    import numpy as np

    return np.log(np.clip(p, 1e-12, None))


def _plot_usage_layer(res: Dict, path: str) -> None:
    plt = _plt()
    budgets = [str(k) for k in res["budgets"]]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.8), squeeze=False)
    L = res["n_layers"]
    for ax, k in zip(axes[0], budgets):
        series = [(p, res["usage_layer"][p].get(k)) for p in ("oracle_token", "oracle_sequence",
                                                              "router", "supervised")]
        series = [(p, v) for p, v in series if v is not None]
        w = 0.8 / max(1, len(series))
        for j, (p, v) in enumerate(series):
            ax.bar([i + j * w for i in range(L)], v, width=w, label=p.replace("_", " "))
        ax.set_xticks([i + 0.4 - w / 2 for i in range(L)], [str(i) for i in range(L)])
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction routed big")
        ax.set_ylim(0, 1)
        ax.set_title(f"k = {k} of {L} big")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(v: List[float], n_bins: int = 16) -> (List[float], List[float]):
    n = len(v)
    n_bins = max(1, min(n_bins, n))
    xs, ys = [], []
    for b in range(n_bins):
        lo, hi = b * n // n_bins, (b + 1) * n // n_bins
        if hi > lo:
            xs.append((lo + hi - 1) / 2)
            ys.append(sum(v[lo:hi]) / (hi - lo))
    return xs, ys


def _plot_usage_position(res: Dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, lab in (("oracle_token_at_most", "oracle (token, at most k)"),
                   ("router", "trained router")):
        for k, v in res["usage_position"].get(p, {}).items():
            xs, ys = _smooth(v)
            ax.plot(xs, ys, "-" if p == "router" else "--", marker=".", label=f"{lab}, k={k}")
    ax.set_xlabel("token position")
    ax.set_ylabel("fraction of layers routed big")
    ax.set_title("Big-module usage by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_difficulty(res: Dict, path: str) -> None:
    plt = _plt()
    pts = res["difficulty"]["points"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if pts["kind"] is not None:
        from .synthetic import KIND_NAMES

        for kind, name in KIND_NAMES.items():
            xs = [x for x, c in zip(pts["loss_big"], pts["kind"]) if c == kind]
            ys = [y for y, c in zip(pts["difficulty"], pts["kind"]) if c == kind]
            if xs:
                ax.scatter(xs, ys, s=5, alpha=0.5, label=name)
        ax.legend(fontsize=7, markerscale=3)
    else:
        ax.scatter(pts["loss_big"], pts["difficulty"], s=4, alpha=0.4)
    thr = res["difficulty"]["correlation"]["threshold"]
    ax.axvline(thr, color="gray", ls=":", lw=1)
    ax.set_xlabel("raw loss (all big)")
    ax.set_ylabel(f"difficulty = loss(all small) - oracle ({res['difficulty']['reference']})")
    c = res["difficulty"]["correlation"]
    ax.set_title(f"Difficulty vs raw loss (r = {c['corr_all']:.2f}; "
                 f"high-loss r = {c['corr_high_loss']:.2f})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_agreement(res: Dict, path: str) -> None:
    plt = _plt()
    L = res["n_layers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, e in res["routers"].items():
        ax.plot(range(L), e["agreement"], "-o", label=f"trained router, k={k}")
        ax.plot(range(L), e["supervised_agreement"], "-s", label=f"oracle imitation, k={k}")
        ax.plot(range(L), e["chance_agreement"], ":", color="gray")
    ax.plot([], [], ":", color="gray", label="chance (independent routes, same usage)")
    ax.set_xlabel("layer")
    ax.set_ylabel("agreement with token oracle")
    ax.set_ylim(0, 1)
    ax.set_title("Router vs oracle agreement per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_router_training(res: Dict, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, e in res["routers"].items():
        h = e["history"]
        ax.plot([r["step"] for r in h], [r["objective"] for r in h], label=f"objective, k={k}")
    ax.set_xlabel("router step")
    ax.set_ylabel("LM loss + budget penalty (soft mixing)")
    ax.set_title("Router training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float, nd: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pct(a: float, b: float) -> str:
    return "nan" if not b or math.isnan(a) or math.isnan(b) else f"{100 * a / b:.0f}%"


def _yes(b: bool) -> str:
    return "**yes**" if b else "**no**"


def summary_table(res: Dict) -> str:
    """The loss-vs-budget table as fixed-width text (printed by ``duollm study``)."""
    ks, c = res["ks"], res["curves"]
    cols = ["oracle_token_exactly", "oracle_sequence_exactly", "first_k", "last_k",
            "best_random_pattern", "random_per_token"]
    short = ["oracle-tok", "oracle-seq", "first-k", "last-k", "best-rand", "rand-tok"]
    lines = [f"validation loss (nats/token) by big layers k of {res['n_layers']}",
             "k  " + "".join(f"{s:>11}" for s in short)]
    for i, k in enumerate(ks):
        lines.append(f"{k:<3}" + "".join(f"{c[n][i]:>11.4f}" for n in cols))
    for k, e in res["routers"].items():
        lines.append(f"router k={k}: loss {e['loss']:.4f} at realised {e['realised']:.3f} "
                     f"big (target {e['target']:.3f}); oracle imitation {e['supervised_loss']:.4f}"
                     f" at {e['supervised_realised']:.3f}")
    f = res["findings"]
    lines.append(f"(a) oracle with 1 big layer beats all-big: "
                 f"{'yes' if f['a']['holds'] else 'no'} (token {f['a']['oracle_token_1']:.4f}, "
                 f"sequence {f['a']['oracle_sequence_1']:.4f} vs all-big {f['a']['all_big']:.4f})")
    lines.append(f"(b) routers nearer best random than oracle: "
                 f"{'yes' if f['b']['holds'] else 'no'}")
    lines.append(f"(c) high-loss tokens gain little (r among high-loss < 0.3): "
                 f"{'yes' if f['c']['holds'] else 'no'} (r = {f['c']['corr_high_loss']:.3f})")
    t = res["timings"]
    lines.append("time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items()))
    return "\n".join(lines)


def write_report(res: Dict, out_dir: str) -> List[str]:
    """Write every plot of ``PLOTS`` and ``report.md`` into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    makers = (_plot_loss, _plot_usage_layer, _plot_usage_position, _plot_difficulty,
              _plot_agreement, _plot_router_training)
    paths = []
    for name, make in zip(PLOTS, makers):
        p = os.path.join(out_dir, name)
        make(res, p)
        paths.append(p)
    md = _markdown(res)
    p = os.path.join(out_dir, "report.md")
    with open(p, "w") as f:
        f.write(md)
    paths.append(p)
    return paths


def _markdown(res: Dict) -> str:
    L, ks, c = res["n_layers"], res["ks"], res["curves"]
    cfg = res["config"]
    f = res["findings"]
    B, T = res["oracle_batch"]
    out = [f"# Duo-LLM study: {res['name']}", ""]
    out.append(f"Model preset `{res['preset']}` ({L} layers, d_model {cfg['d_model']}, big FFN "
               f"{cfg['d_big']}, small FFN {cfg['d_small']}), trained {res['steps']} steps with "
               f"random routing on `{res['data']}` (device {res['device']}). Validation loss "
               f"after training: " + ", ".join(f"{k} {_f(v)}" for k, v in
                                               res["train_val_loss"].items()) + ".")
    out.append(f"Oracles and baselines are measured on {B} validation sequences of {T} tokens "
               f"({B * (T - 1)} scored positions). Losses are mean next-token cross-entropy in "
               f"nats; perplexity = exp(loss).")
    out += ["", "## Findings of the paper, checked in this run", ""]
    a = f["a"]
    out.append(f"- **(a) An oracle with one big layer beats all-big:** {_yes(a['holds'])}. "
               f"Token oracle with exactly 1 big layer (context all big): "
               f"{_f(a['oracle_token_1'])}; "
               f"sequence oracle with exactly 1 big layer: {_f(a['oracle_sequence_1'])} "
               f"({'beats' if a['holds_sequence'] else 'does not beat'} all-big); all-big: "
               f"{_f(a['all_big'])}.")
    b = f["b"]
    parts = [f"k={k}: router {_f(v['router'])}, best random {_f(v['best_random'])}, token "
             f"oracle {_f(v['oracle_token'])}, sequence oracle {_f(v['oracle_sequence'])}"
             for k, v in b["per_budget"].items()]
    out.append(f"- **(b) Trained routers land near the best random pattern rather than the "
               f"oracle:** {_yes(b['holds'])} (router loss nearer the best-of-"
               f"{res['n_random']} random pattern than the token oracle at every budget). "
               + "; ".join(parts) + ".")
    cc = f["c"]
    out.append(f"- **(c) High-loss tokens gain little from extra compute:** {_yes(cc['holds'])} "
               f"(criterion: Pearson r of difficulty with raw loss among the top-quartile "
               f"raw-loss tokens < 0.3). r among {cc['n_high']} high-loss tokens (raw loss >= "
               f"{_f(cc['threshold'], 3)}) = {_f(cc['corr_high_loss'], 3)}; over all tokens "
               f"r = {_f(cc['corr_all'], 3)}; mean difficulty of high-loss tokens "
               f"{_f(cc['mean_difficulty_high'])} vs the rest {_f(cc['mean_difficulty_rest'])} "
               f"(mean raw loss {_f(cc['mean_loss_high'])} vs {_f(cc['mean_loss_rest'])}, so "
               f"the gain is {_pct(cc['mean_difficulty_high'], cc['mean_loss_high'])} of a "
               f"high-loss token's loss and "
               f"{_pct(cc['mean_difficulty_rest'], cc['mean_loss_rest'])} of the rest's). "
               f"Within the high-loss tokens the gain does not grow with the loss when r is "
               f"near zero or negative; in absolute terms they gain "
               f"{'more' if cc['mean_difficulty_high'] > cc['mean_difficulty_rest'] else 'less'}"
               f" than the rest on average.")
    out += ["", "## Loss vs budget", "", "![loss vs budget](loss_vs_budget.png)", ""]
    head = ["k big", "ppl(oracle tok)"] + [_CURVE_LABELS[n] for n in c]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for i, k in enumerate(ks):
        row = [str(k), f"{math.exp(c['oracle_token_exactly'][i]):.2f}"]
        row += [_f(c[n][i]) for n in c]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append(f"All small: {_f(res['all_small'])} (ppl {math.exp(res['all_small']):.2f}); "
               f"all big: {_f(res['all_big'])} (ppl {math.exp(res['all_big']):.2f}). The token "
               f"oracle changes only the scored token's own path (its context stays all big), so "
               f"it is an optimistic bound, not a deployable routing; the sequence oracle routes "
               f"every token of a sequence with one pattern and costs exactly k big layers. Best "
               f"random: the best of {res['n_random']} random layer patterns with k big layers "
               f"(duplicates removed: " + ", ".join(
                   f"k={k} {v['distinct']} distinct" for k, v in res["best_random"].items())
               + "), chosen on the same batch.")
    out += ["", "## Routers", ""]
    out.append("| k | target | realised | loss | argmax loss (realised) | objective first -> "
               "last | oracle imitation loss (realised, train acc) | best random | token oracle |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for k, e in res["routers"].items():
        i = int(k)
        out.append(f"| {k} | {e['target']:.3f} | {e['realised']:.3f} | {_f(e['loss'])} | "
                   f"{_f(e['argmax_loss'])} ({e['argmax_realised']:.3f}) | "
                   f"{_f(e['objective_first'])} -> {_f(e['objective_last'])} | "
                   f"{_f(e['supervised_loss'])} ({e['supervised_realised']:.3f}, "
                   f"{e['supervised_accuracy']:.3f}) | {_f(c['best_random_pattern'][i])} | "
                   f"{_f(c['oracle_token_exactly'][i])} |")
    out.append("")
    out.append("Trained router: per-layer linear map of the FFN input, soft mixing of the big "
               "and small outputs during training with an annealed softmax temperature, model "
               "frozen, penalty on the expected big fraction. Evaluated with hard routes; its "
               "threshold is calibrated on a training batch so the realised big fraction "
               "matches the target (the realised value on the validation batch is reported). "
               "Oracle imitation: the same router trained by cross-entropy on the token "
               "oracle's routes (exactly k big, context big) of training sequences.")
    out += ["", "![router training](router_training.png)", "",
            "## Big-module usage", "", "![usage per layer](usage_per_layer.png)", "",
            "![usage by position](usage_by_position.png)", "",
            "## Router / oracle agreement", "", "![agreement](agreement.png)", ""]
    out.append("| k | layer | trained router | oracle imitation | chance |")
    out.append("|---|---|---|---|---|")
    for k, e in res["routers"].items():
        for layer in range(L):
            out.append(f"| {k} | {layer} | {e['agreement'][layer]:.3f} | "
                       f"{e['supervised_agreement'][layer]:.3f} | "
                       f"{e['chance_agreement'][layer]:.3f} |")
    d = res["difficulty"]
    out += ["", "## Token difficulty", "", "![difficulty vs loss](difficulty_vs_loss.png)", ""]
    out.append(f"Difficulty = loss with all layers small - loss of the token oracle "
               f"({d['reference']}, context all small): how much a token gains from extra "
               f"compute. Mean difficulty {_f(d['mean_difficulty'])}. Per-token values are in "
               f"`difficulty.csv` (oracle columns for at most {d['budgets']} big layers).")
    if d["by_kind"]:
        out += ["", "| ground-truth kind | tokens | loss (all big) | loss (all small) | "
                "difficulty |", "|---|---|---|---|---|"]
        for name, v in d["by_kind"].items():
            out.append(f"| {name} | {v['n']} | {_f(v['loss_big'])} | {_f(v['loss_small'])} | "
                       f"{_f(v['difficulty'])} |")
    out += ["", "## Oracle search", ""]
    s = res["oracle_speed"]
    out.append(f"Exhaustive search over all {2 ** L} patterns on {s['positions']} positions: "
               f"sequence granularity {s['sequence_s']:.2f} s ({s['sequence_patterns_per_s']:.0f} "
               f"patterns/s), token granularity {s['token_s']:.2f} s "
               f"({s['token_patterns_per_s']:.0f} patterns/s; each pattern at every position).")
    out += ["", "| method | budget | loss | exhaustive | gap | patterns evaluated |",
            "|---|---|---|---|---|---|"]
    for name, v in res["approx"].items():
        method, k = name.rsplit("_k", 1)
        out.append(f"| {method} | exactly {k} | {_f(v['loss'])} | {_f(v['exhaustive'])} | "
                   f"{v['gap']:.2e} | {v['patterns_evaluated']} |")
    t = res["timings"]
    out += ["", "## Run time", "", ", ".join(f"{k[:-2]}: {v:.1f} s" for k, v in t.items()), ""]
    return "\n".join(out)
