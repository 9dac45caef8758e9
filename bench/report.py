"""The run's results as JSON, one PNG and a short README (also printed)."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 100:
        return f"{v:,.0f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def _ok(flag: bool | None) -> str:
    return "-" if flag is None else ("met" if flag else "**missed**")


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n:,}"


def _drain_label(d: dict[str, Any]) -> str:
    what = "default settings" if d.get("default_settings") else "batch"
    reps = d.get("replicas", 1)
    return (f"{what} ({d['batch']} x {d['concurrency']} lanes)"
            + (f" x {reps} replicas" if reps > 1 else ""))


BUSY_OTHERS_CORES = 0.3  # other processes above this during a phase: its figures are flagged


def busy_phases(r: dict[str, Any]) -> dict[str, float]:
    """Every phase (a results entry with a `cpu_cores` record) during which processes other than
    the bench, its PostgreSQL and the consumer used more than BUSY_OTHERS_CORES cores: its
    path in results.json -> those cores."""
    out: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            cores = node.get("cpu_cores")
            if isinstance(cores, dict) and (cores.get("others_cores") or 0) > BUSY_OTHERS_CORES:
                out[path] = cores["others_cores"]
            for k, v in node.items():
                if k not in ("cdf_ms", "timeline"):
                    walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk({k: v for k, v in r.items() if k not in ("machine", "args", "targets")}, "")
    return out


def _busy(d: dict[str, Any]) -> str:
    """' (BUSY: x cores)' when other processes used more than BUSY_OTHERS_CORES in `d`."""
    others = (d.get("cpu_cores") or {}).get("others_cores") or 0
    return f" (BUSY: others {others} cores)" if others > BUSY_OTHERS_CORES else ""


def sustained_limit(r: dict[str, Any]) -> tuple[float, float, float] | None:
    """(P, D, 1 / (1/P + 1/D)): the step-up producer alone, the default one-worker drain, and
    the most writers and worker together can do on this machine (they share its cores)."""
    ceil = next((c for c in r.get("producer_ceiling", []) if c.get("used_in_stepup")), None)
    drain = next((d for d in r.get("drain", [])
                  if d.get("default_settings") and d.get("replicas", 1) == 1), None)
    if not ceil or not drain or not ceil["rate"] or not drain["rate"]:
        return None
    p, d = float(ceil["rate"]), float(drain["rate"])
    return p, d, 1 / (1 / p + 1 / d)


def evaluate(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met) rows; met None: reported, no target."""
    t = r["targets"]
    rows: list[tuple[str, str, str, bool | None]] = []
    drains = r.get("drain", [])
    for d in drains:
        default_one = d.get("default_settings") and d.get("replicas", 1) == 1
        rows.append((f"drain {_size(d['readings'])}, {_drain_label(d)}, vs COPY ceiling",
                     f"{d['rate']:,}/s = {d['ratio_to_ceiling_same_db']:.2f} x "
                     f"{d['ceiling_copy']['rate']:,}/s",
                     f">= {t['drain_vs_ceiling']} x" if default_one else "-",
                     d["ratio_to_ceiling_same_db"] >= t["drain_vs_ceiling"]
                     if default_one else None))
    one = next((d for d in drains if d.get("default_settings") and d.get("replicas", 1) == 1),
               None)
    two = next((d for d in drains if d.get("default_settings") and d.get("replicas") == 2),
               None)
    if one and two:
        ratio = two["rate"] / one["rate"]
        norm = two["ratio_to_ceiling_same_db"] / one["ratio_to_ceiling_same_db"]
        rows.append((f"drain {_size(one['readings'])}, 2 replicas vs 1, default settings",
                     f"{ratio:.2f} x ({norm:.2f} x, each against its own ceiling)",
                     f">= {t['replicas_2_over_1']} x", ratio >= t["replicas_2_over_1"]))
    live = r.get("live", {})
    s1 = live.get("steady_1000")
    if s1:
        lv = s1["latency_ms"]["visible_to_commit"]
        rows.append(("p50 reading visible -> prediction commit at 1,000/s",
                     f"{lv['p50']} ms{_busy(s1)}", f"<= {t['visible_p50_ms_at_1k']} ms",
                     lv["p50"] <= t["visible_p50_ms_at_1k"]))
        rows.append(("p99 reading visible -> prediction commit at 1,000/s",
                     f"{lv['p99']} ms{_busy(s1)}", f"<= {t['visible_p99_ms_at_1k']} ms",
                     lv["p99"] <= t["visible_p99_ms_at_1k"]))
        li = s1["latency_ms"]["insert_to_commit"]
        lw = s1["latency_ms"]["insert_to_visible"]
        rows.append(("insert -> prediction commit at 1,000/s, p50 / p99 (the writer's own "
                     "insert -> visible)", f"{li['p50']} / {li['p99']} ms ({lw['p50']} / "
                     f"{lw['p99']} ms)", "-", None))
    for key in sorted((k for k in live if k.startswith("steady_")),
                      key=lambda k: int(k.split("_")[1])):
        s, fl = live[key], live.get("floor_" + key.split("_")[1])
        ratio = s.get("vs_floor")
        if not fl or not ratio:
            continue
        a, b = s["latency_ms"]["visible_to_commit"], fl["latency_ms"]["visible_to_commit"]
        for q, target in (("p50", t.get("floor_p50_ratio", 1.5)),
                          ("p99", t.get("floor_p99_ratio", 3.0))):
            got = ratio.get(f"{q}_ratio")
            rows.append((f"{q} visible -> prediction commit at {s['target_rate']:,}/s, ours / "
                         "the floor (bench/floor.py, same run)",
                         f"{_fmt(got)} x ({a.get(q)} / {b.get(q)} ms)"
                         + (" (BUSY)" if _busy(s) or _busy(fl) else ""),
                         f"<= {target} x", got is not None and got <= target))
    ft = live.get("foreign_transaction")
    if ft:
        w, wo = ft["with"], ft["without"]
        rows.append(("1,000/s with a write transaction open in another database: scored within "
                     "1 s of visible (without it)",
                     f"{w['share_within_1s']:.1%} ({wo['share_within_1s']:.1%}); p99 "
                     f"{w['visible_to_commit_ms'].get('p99')} ms, max "
                     f"{w['visible_to_commit_ms'].get('max')} ms"
                     + (" - STALLED" if ft.get("stalled") else ""),
                     f">= {t['foreign_within_1s_share']:.0%}",
                     w["share_within_1s"] >= t["foreign_within_1s_share"]))
    st = live.get("stepup")
    if st:
        ceil = next((c for c in r.get("producer_ceiling", []) if c.get("used_in_stepup")), None)
        rows.append(("sustained rate with the backlog bounded (step-up)",
                     f"{_fmt(st['max_bounded_rate'])}/s"
                     + (f" (producer alone: {ceil['rate']:,}/s)" if ceil else ""),
                     f">= {t['sustained_rate']:,}/s",
                     (st["max_bounded_rate"] or 0) >= t["sustained_rate"]))
        limit = sustained_limit(r)
        if limit is not None:
            p, d, both = limit
            got = (st["max_bounded_rate"] or 0) / both
            rows.append(("sustained rate vs the machine's limit for writers and worker "
                         "together, 1 / (1/P + 1/D) (P the producer alone, D the default drain)",
                         f"{got:.2f} x ({_fmt(st['max_bounded_rate'])} / {both:,.0f}/s; P "
                         f"{p:,.0f}/s, D {d:,.0f}/s)",
                         f">= {t.get('sustained_vs_limit', 0.85)} x",
                         got >= t.get("sustained_vs_limit", 0.85)))
    rs = r.get("restart")
    if rs:
        rows.append(("SIGKILL -> first prediction of the restarted worker, median (max)",
                     f"{rs['median_s']} s ({rs['max_s']} s) over {len(rs['kills'])} kills",
                     f"<= {t['restart_median_s']} s",
                     rs["median_s"] is not None and rs["median_s"] <= t["restart_median_s"]))
        eo = rs["exactly_once"]
        rows.append(("readings lost / doubled across the kills",
                     f"{eo['lost']} / {eo['duplicated']} of {eo['readings']:,}", "0", eo["ok"]))
    sw = live.get("swaps")
    if sw:
        rows.append(("model swap: commit -> first new-version prediction, median (max)",
                     f"{sw['median_s']} s ({sw['max_s']} s)", f"<= {t['swap_median_s']} s",
                     sw["median_s"] is not None and sw["median_s"] <= t["swap_median_s"]))
    eo = live.get("exactly_once")
    if eo:
        rows.append(("readings lost / doubled (swaps + all live load)",
                     f"{eo['lost']} / {eo['duplicated']} of {eo['readings']:,}"
                     + (f" ({eo['still_waiting']:,} still waiting at the end)"
                        if eo["still_waiting"] else ""), "0", eo["ok"]))
    dr = r.get("drift")
    if dr:
        worst = max(dr["ratio_1M_over_100_by_batch"].values())
        rec = min(dr.get("recount_ratio_1M_over_100_by_batch", {"-": 0}).values())
        rows.append(("drift tracker cost, window 1M / window 100 (per batch)",
                     f"{worst:.2f} x (a recount of the window: {rec:.0f} x)",
                     f"<= {t['drift_flat_ratio']} x (flat)", worst <= t["drift_flat_ratio"]))
    sh = r.get("shadow")
    if sh and sh.get("median_ratio") is not None:
        off, on = sh["median_us_per_reading"]["off"], sh["median_us_per_reading"]["on"]
        rows.append((f"worker CPU per reading with a shadow candidate vs without, at "
                     f"{sh['rate']:,}/s (median of {len(sh['ratio_per_round'])} alternating "
                     "rounds)", f"{sh['median_ratio']:.2f} x ({on} vs {off} us)",
                     f"<= {t['shadow_cpu_ratio']} x", sh["median_ratio"] <= t["shadow_cpu_ratio"]))
    ad = r.get("adoption")
    if ad and ad.get("adopted_vs_fresh") is not None:
        rows.append(("drain of an adopted backlog (the old predictor scored 45 %) vs a fresh one, "
                     "same run", f"{ad['adopted_vs_fresh']} x ({_fmt(ad.get('drain_rate'))}/s)",
                     f">= {t.get('adopted_vs_fresh', 0.9)} x",
                     ad["adopted_vs_fresh"] >= t.get("adopted_vs_fresh", 0.9)))
    wr = r.get("writers", {}).get("clients", {})
    for clients, table in sorted(wr.items()):
        row, always = table.get("doorbell_worker"), table.get("always_worker")
        if not row or row.get("ratio") is None:
            continue
        eight = clients == "c8"
        rows.append((f"{clients[1:]} single-row writers: tps with a worker woken by the doorbell "
                     "/ by polling (bench/writers.py; a NOTIFY per transaction: "
                     f"{_fmt(always and always.get('ratio'))} x)",
                     f"{row['ratio']} x ({row['tps_median']:,} tps; "
                     f"{row['notify_share_median']:.1%} of transactions notified)",
                     f">= {t.get('writers_ratio', 0.9)} x" if eight else "-",
                     row["ratio"] >= t.get("writers_ratio", 0.9) if eight else None))
        idle = table.get("doorbell")
        if idle and idle.get("ratio") is not None:
            rows.append((f"{clients[1:]} single-row writers, no worker: tps with the doorbell "
                         "trigger / with no trigger", f"{idle['ratio']} x",
                         f">= {t.get('writers_ratio', 0.9)} x" if eight else "-",
                         idle["ratio"] >= t.get("writers_ratio", 0.9) if eight else None))
    mem = r.get("memory", {}).get("this")
    if mem:
        rows.append(("worker RSS at rest, one model, idle (bench/memory.py)",
                     f"{_fmt(mem.get('steady_rss_mb'))} MB", f"<= {t.get('rest_rss_mb', 300)} MB",
                     (mem.get("steady_rss_mb") or 1e9) <= t.get("rest_rss_mb", 300)))
        rows.append(("swap to a model not in the cache: commit -> first prediction",
                     f"{_fmt(mem.get('swap_uncached_to_first_prediction_s'))} s", "-", None))
    if drains:
        peak = max(d["peak_rss_mb"] for d in drains)
        rows.append((f"worker peak RSS (VmHWM) draining {_size(drains[0]['readings'])}, per "
                     "process", f"{peak} MB",
                     f"<= {t['rss_mb']} MB", peak <= t["rss_mb"]))
    return rows


def summary(r: dict[str, Any]) -> str:
    m = r["machine"]
    pg = r.get("postgres", {})
    lines = [
        "# Benchmark results",
        "",
        f"Run `{r['args'].get('command', '.venv/bin/python -m bench')}` on {m['date_utc']}: "
        f"{m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB, PostgreSQL "
        f"{pg.get('version', '?')}, Python {m['python']}, git {m['git'].get('commit')}"
        f"{' (dirty)' if m['git'].get('dirty') else ''}; {r['bench_seconds']} s end to end.",
        "",
        f"PostgreSQL: a throwaway cluster with **fsync={pg.get('settings', {}).get('fsync')}, "
        f"synchronous_commit={pg.get('settings', {}).get('synchronous_commit')}** (durable, as "
        "in production), shared_buffers "
        f"{pg.get('settings', {}).get('shared_buffers')}, track_commit_timestamp on (exact "
        "per-reading latency). The machine is shared and noisy: compare ratios within this run.",
        "",
        "## Targets",
        "",
        "| what | measured | target | |",
        "|---|---|---|---|",
    ]
    for what, measured, target, met in evaluate(r):
        lines.append(f"| {what} | {measured} | {target} | {_ok(met)} |")
    busy = busy_phases(r)
    lines += ["", f"Machine load: other processes (not this bench, its PostgreSQL or the "
              f"consumer measured) above {BUSY_OTHERS_CORES} cores during "
              + (f"{len(busy)} phase(s), whose figures are flagged BUSY: "
                 + ", ".join(f"`{k}` {v} cores" for k, v in busy.items()) + "."
                 if busy else "no phase: every figure was measured on a quiet machine.")]
    drains = r.get("drain", [])
    if drains:
        ceil = [d["ceiling_copy"]["rate"] for d in drains]
        lines += [
            "",
            f"## Ceiling and drain ({_size(drains[0]['readings'])} readings waiting, worker a "
            "real subprocess)",
            "",
            f"Ceiling, binary COPY (copy_records_to_table, 10,000-row transactions) of "
            f"{_size(drains[0]['readings'])} readings with no worker: median "
            f"**{statistics.median(ceil):,.0f}/s** over "
            f"{len(ceil)} loads ({', '.join(f'{c:,}' for c in ceil)}). Each drain is compared "
            "with the load of its own database, just before it. A drain not finished within "
            f"{r['args'].get('drain_cap')} s is rated on what it scored by then.",
            "",
            "| configuration | drain readings/s (drained?) | x ceiling (same DB) | "
            "first->last commit | worker CPU | PostgreSQL CPU | other processes | peak RSS | "
            "exactly once |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in drains:
            lines.append(
                f"| {_drain_label(d)} | {d['rate']:,}"
                f"{'' if d['drained'] else ' (not drained in the cap)'} | "
                f"{d['ratio_to_ceiling_same_db']:.2f} | {d['first_to_last_commit_s']} s | "
                f"{d['worker_cpu_share']:.0%} of a core | "
                f"{d['cpu_cores'].get('postgres', '-')} cores | "
                f"{d['cpu_cores'].get('others_cores', '-')} cores | {d['peak_rss_mb']} MB | "
                f"{'yes' if d['exactly_once']['ok'] else 'NO'} |")
    live = r.get("live", {})
    steady = [v for k, v in live.items() if k.startswith("steady_")]
    if steady:
        lines += [
            "",
            "## Steady load (paced producer, 100-row multi-row INSERTs), latency in ms",
            "",
            "| load | consumer | produced | insert->commit p50 / p95 / p99 / max | writer's "
            "own INSERT p50 | reading commit->prediction commit p50 / p99 / max | ours / floor "
            "p50, p99 | histogram p50 / p99 | consumer CPU | other processes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in steady:
            a = s["latency_ms"]["insert_to_commit"]
            b = s["latency_ms"]["visible_to_commit"]
            w = s["latency_ms"]["insert_to_visible"]
            h = s["histogram_ms"]
            ratio = s.get("vs_floor") or {}
            fl = live.get(f"floor_{s['target_rate']}")
            for consumer, row in (("ours", s), ("floor", fl)):
                if row is None:
                    continue
                a = row["latency_ms"]["insert_to_commit"]
                b = row["latency_ms"]["visible_to_commit"]
                w = row["latency_ms"]["insert_to_visible"]
                h = row["histogram_ms"]
                others = row["cpu_cores"].get("others_cores", "-")
                lines.append(
                    f"| {row['target_rate']:,}/s | {consumer} | {row['produced_rate']:,}/s | "
                    f"{a.get('p50')} / {a.get('p95')} / {a.get('p99')} / {a.get('max')} | "
                    f"{w.get('p50')} | {b.get('p50')} / {b.get('p99')} / {b.get('max')} | "
                    + (f"{_fmt(ratio.get('p50_ratio'))} x, {_fmt(ratio.get('p99_ratio'))} x"
                       if consumer == "ours" and ratio else "-")
                    + f" | {_fmt(h.get('p50'))} / {_fmt(h.get('p99'))} "
                    f"| {row['worker_cpu_share']:.0%} of a core | {others} cores"
                    f"{' **BUSY**' if _busy(row) else ''} |")
        lines += [
            "",
            "insert->commit: from the reading's INSERT statement start (`inserted_at`) to the "
            "commit of its prediction (`pg_xact_commit_timestamp` of the prediction row), exact "
            "per reading; it includes the writer's own statement and commit. reading commit->"
            "prediction commit: from when the reading became visible. histogram: the worker's "
            "own `sensor_prediction_latency_seconds`, scraped before/after, bucket-interpolated. "
            "floor: `bench/floor.py`, a minimal durable NOTIFY consumer (one transaction per "
            "wake-up: lock a cursor row, read float8[] features, predict with numpy, COPY the "
            "predictions, move the cursor, commit) in its own database cloned from the same "
            "template, fed by the same producer right after ours, notified by its own statement "
            "trigger (the product's is disabled there). "
            "other processes: CPU used on this shared 2-core machine by processes that are not "
            "this bench, its PostgreSQL or the worker.",
        ]
    ft = live.get("foreign_transaction")
    if ft:
        lines += ["", f"## A write transaction open in another database ({ft['rate']:,} "
                  f"readings/s, {ft['seconds']:.0f} s each)", "",
                  "Same worker, same database, back to back: first without, then with a "
                  "transaction holding an xid open in a neighbouring database of the same "
                  "cluster for the whole load; it commits at the end. Latency from the "
                  "reading's commit to its prediction's commit, in ms.", "",
                  "| case | readings | p50 | p99 | max | scored within 1 s | scored before the "
                  "release | unscored after "
                  f"{ft['timeout_s']:.0f} s more | release -> all scored |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for case in ("without", "with"):
            c = ft[case]
            v = c["visible_to_commit_ms"]
            lines.append(f"| {case} | {c['readings']:,} | {v.get('p50', '-')} | "
                         f"{v.get('p99', '-')} | {v.get('max', '-')} | "
                         f"{c['share_within_1s']:.1%} | {c['share_before_release']:.1%} | "
                         f"{c['unscored']:,} | {_fmt(c['release_to_drained_s'])} s |")
        if ft.get("stalled"):
            lines += ["", "**Stalled**: with the foreign transaction open, readings waited for "
                      "it to end."]
    pc = r.get("producer_ceiling")
    if pc:
        lines += ["", "## Producer ceiling (flat out, empty table, no worker)", "",
                  "| shape | readings/s |", "|---|---|"]
        for c in pc:
            used = " (the step-up's)" if c["used_in_stepup"] else ""
            lines.append(f"| {c['shape']}{used} | {c['rate']:,} |")
        lines += ["", "insert:ROWSxCONNS: plain multi-row `INSERT INTO readings (\"timestamp\", "
                  "\"values\", machine_id) VALUES ...` of ROWS readings (literal JSON, the old "
                  "writers' SQL) over CONNS connections; copy: text `COPY FROM STDIN`."]
    st = live.get("stepup")
    if st:
        lines += ["", "## Rate step-up (backlog = the product's backlog query, sampled 2/s)", "",
                  f"Producer {st.get('producer', '?')}. Bounded: the backlog in the second "
                  "half of the step under max(2,000, 0.5 s of writes), and the worker's counter "
                  ">= 90 % of what was written. The step-up stops after the first step not "
                  "bounded.", "",
                  "| target | produced | consumed | backlog max / end | bounded |",
                  "|---|---|---|---|---|"]
        for s in st["steps"]:
            lines.append(f"| {s['target_rate']:,}/s | {s['produced_rate']:,}/s"
                         f"{'' if s['producer_reached_target'] else ' (producer-limited)'} | "
                         f"{s['consumed_rate']:,}/s | {s['backlog_max']:,} / {s['backlog_end']:,}"
                         f" | {'yes' if s['bounded'] else 'no'} |")
        lines.append("")
        lines.append(f"Highest rate with the backlog bounded: **{_fmt(st['max_bounded_rate'])}"
                     f"/s**" + (" (the producer could not write faster on this machine: the "
                                "worker kept up with everything written)"
                                if st["max_bounded_limited_by_producer"] else "") + ".")
    rs = r.get("restart")
    if rs:
        lines += ["", f"## SIGKILL -> restarted worker ({len(rs['kills'])} kills under "
                  f"{rs['rate']:,} readings/s)", "",
                  "The worker is killed at a random moment and a new one started at once, as a "
                  "supervisor would. First prediction: the first commit of a prediction whose "
                  "scoring transaction began after the kill.", "",
                  "| kill | -> first prediction | spawn -> ready | kill -> model loaded | "
                  "new worker's counter just after |", "|---|---|---|---|---|"]
        for i, k in enumerate(rs["kills"], 1):
            lines.append(f"| {i} | {_fmt(k['to_first_prediction_s'])} s | "
                         f"{_fmt(k['spawn_to_ready_s'])} s | "
                         f"{_fmt(k['kill_to_model_loaded_s'])} s | "
                         f"{k['new_worker_predictions']:,} |")
        eo = rs["exactly_once"]
        lines += ["", f"Median **{rs['median_s']} s**, max {rs['max_s']} s. Readings lost: "
                  f"{eo['lost']}, doubled: {eo['duplicated']} of {eo['readings']:,}."]
    sw = live.get("swaps")
    if sw:
        lines += ["", f"## Model swaps ({len(sw['swaps'])} under {sw['rate']:,} readings/s)", "",
                  f"Commit of the clusters change -> first committed prediction of the new "
                  f"version: median **{sw['median_s']} s**, max {sw['max_s']} s; -> model "
                  f"loaded (worker log): median {sw['loaded_median_s']} s. Readings lost: "
                  f"{live['exactly_once']['missing']}, doubled: "
                  f"{live['exactly_once']['duplicated']}."]
    od = r.get("old_design")
    if od:
        best = max((d["rate"] for d in drains), default=None)
        default = next((d["rate"] for d in drains
                        if d.get("default_settings") and d.get("replicas", 1) == 1), None)
        bounded = st["max_bounded_rate"] if st else None
        lines += [
            "", "## Against the old design (poll, batch 100, one INSERT per prediction)", "",
            f"Same 1M-waiting database. Its cycle (SELECT unpredicted via anti-join, decode JSON, "
            f"predict, 100 INSERTs, commit) takes {od['cycle_work_median_ms']} ms median "
            f"(select {od['cycle_select_median_ms']}, predict {od['cycle_predict_median_ms']}, "
            f"insert+commit {od['cycle_insert_commit_median_ms']}); back to back that is "
            f"**{od['capacity_interval_0_per_s']:,}/s**; as designed (every 30 s) "
            f"**{od['design_throughput_per_s']}/s**, with 0-30 s added delay (p50 "
            f"~{od['design_latency_p50_s']} s).",
            "",
            "| | ours | old, interval 0 | old, as designed (30 s) |",
            "|---|---|---|---|",
        ]
        if default:
            lines.append(f"| drain, default settings, one worker | {default:,}/s | "
                         f"{default / od['capacity_interval_0_per_s']:.0f} x | "
                         f"{default / od['design_throughput_per_s']:,.0f} x |")
        if best:
            lines.append(f"| drain, best configuration | {best:,}/s | "
                         f"{best / od['capacity_interval_0_per_s']:.0f} x | "
                         f"{best / od['design_throughput_per_s']:,.0f} x |")
        if bounded:
            lines.append(f"| sustained rate, backlog bounded | {bounded:,}/s | "
                         f"{bounded / od['capacity_interval_0_per_s']:.0f} x | "
                         f"{bounded / od['design_throughput_per_s']:,.0f} x |")
        s1 = live.get("steady_1000")
        if s1:
            lines.append(f"| latency p50 at load it sustains | "
                         f"{s1['latency_ms']['insert_to_commit']['p50']} ms (1,000/s) | - | "
                         f"~{od['design_latency_p50_s']} s (<= 3.3/s) |")
    dr = r.get("drift")
    if dr:
        lines += ["", "## Drift tracker, median cost per batch (us)", "",
                  "| window | batch | tracker | recount baseline |", "|---|---|---|---|"]
        for c in dr["cells"]:
            lines.append(f"| {c['window']:,} | {c['batch']:,} | {c['tracker_us']} | "
                         f"{c['recount_us']} |")
    lines += ["", "Files: `results.json` (everything, with timelines), `results.png`.", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    m = r["machine"]
    fig.suptitle(f"sensor-predictor bench, {m['date_utc'][:16]} UTC: {m['cpu_model']}, "
                 f"{m['cores']} cores, {m['memory_gb']} GB, PostgreSQL "
                 f"{r.get('postgres', {}).get('version', '?')} (fsync on), Python {m['python']}",
                 fontsize=11)
    live = r.get("live", {})

    ax = axes[0][0]
    colours = {"steady_1000": "tab:blue", "steady_10000": "tab:orange"}
    for key, s in live.items():
        if not key.startswith("steady_"):
            continue
        c = colours.get(key)
        fl = live.get("floor_" + key.split("_")[1])
        for kind, style, what, src in (
                ("insert_to_commit", "-", "INSERT start -> prediction commit", s),
                ("visible_to_commit", ":", "reading commit -> prediction commit", s),
                ("visible_to_commit", "-.", "the floor (bench/floor.py): reading commit -> "
                 "prediction commit", fl)):
            pts = src["cdf_ms"].get(kind) if src else None
            if pts:
                ax.plot([max(p[0], 0.01) for p in pts], [p[1] for p in pts], style, color=c,
                        lw=1.6 if kind == "insert_to_commit" else 1.1,
                        label=f"{s['target_rate']:,}/s: {what}")
    ft = live.get("foreign_transaction")
    for case, colour in (("without", "tab:green"), ("with", "tab:red")):
        pts = ft[case].get("cdf_ms") if ft else None
        if pts:
            ax.plot([max(p[0], 0.01) for p in pts], [p[1] for p in pts], "--", color=colour,
                    lw=1.1, label=f"{ft['rate']:,}/s, {case} a write transaction open in "
                                  "another database: reading commit -> prediction commit")
    t = r["targets"]
    for x, lbl in ((t["visible_p50_ms_at_1k"], "visible->commit p50 target"),
                   (t["visible_p99_ms_at_1k"], "visible->commit p99 target")):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
        ax.text(x, 0.02, lbl, rotation=90, fontsize=8, color="grey", ha="right")
    ax.axhline(0.5, color="lightgrey", lw=0.6)
    ax.axhline(0.99, color="lightgrey", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("latency per reading (ms, log)")
    ax.set_ylabel("share of readings")
    ax.set_title("Latency distribution at steady load (exact, from commit timestamps)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    for d in r.get("drain", []):
        tl = [p for p in d["timeline"] if p[0] >= -0.5]
        ts, rates = [], []
        for (t0, n0, _), (t1, n1, _) in zip(tl, tl[4:], strict=False):  # over ~1 s
            if t1 > t0 and n0 < d["readings"]:
                ts.append(t1)
                rates.append((n1 - n0) / (t1 - t0) / 1000)
        ax.plot(ts, rates, label=f"drain, {_drain_label(d)}: "
                                 f"{d['rate'] / 1000:.0f}k/s")
    if r.get("drain"):
        ceil = statistics.median(d["ceiling_copy"]["rate"] for d in r["drain"]) / 1000
        ax.axhline(ceil, color="black", ls="--", lw=1, label=f"COPY ceiling {ceil:.0f}k/s")
        frac = r["targets"]["drain_vs_ceiling"]
        ax.axhline(ceil * frac, color="grey", ls=":", lw=1,
                   label=f"target (default settings): {frac} x ceiling")
    od = r.get("old_design")
    if od:
        ax.axhline(od["capacity_interval_0_per_s"] / 1000, color="tab:red", ls="-.", lw=1,
                   label=f"old design, back to back: {od['capacity_interval_0_per_s']:.0f}/s")
    ax.set_xlabel("seconds since the first prediction")
    ax.set_ylabel("readings scored per second (thousands)")
    n = r.get("drain", [{}])[0].get("readings", 0) if r.get("drain") else 0
    ax.set_title(f"Drain of {n:,} waiting readings: throughput over time (1 s windows)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)

    ax = axes[1][0]
    st = live.get("stepup")
    if st and st["samples"]:
        smp = st["samples"]
        ts = [s[0] for s in smp[1:]]
        consumed = [(b[2] - a[2]) / (b[0] - a[0]) / 1000 for a, b in itertools.pairwise(smp)]
        ax.plot(ts, consumed, color="tab:green", lw=1, label="scored /s (worker counter)")
        for s in st["steps"]:
            ax.hlines(s["produced_rate"] / 1000, s["start_s"], s["end_s"], color="tab:blue",
                      lw=2.5, label="written /s (producer)" if s is st["steps"][0] else None)
            ax.text((s["start_s"] + s["end_s"]) / 2, s["produced_rate"] / 1000,
                    f"{s['target_rate'] // 1000}k", ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("readings per second (thousands)")
        ax2 = ax.twinx()
        ax2.plot([s[0] for s in smp], [max(s[1], 1) for s in smp], color="tab:red", lw=1,
                 label="backlog (readings, log)")
        ax2.set_yscale("log")
        ax2.set_ylabel("backlog (readings, log)", color="tab:red")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_title(f"Rate step-up, {st['step_seconds']:.0f} s a step: highest bounded rate "
                     f"{_fmt(st['max_bounded_rate'])}/s")
        ax.grid(alpha=0.3)

    ax = axes[1][1]
    bars: list[tuple[str, float, str]] = []
    if r.get("drain"):
        bars.append(("COPY ceiling\n(median)", statistics.median(
            d["ceiling_copy"]["rate"] for d in r["drain"]), "black"))
        for d in r["drain"]:
            reps = d.get("replicas", 1)
            bars.append((f"drain\n{d['batch']}x{d['concurrency']}"
                         + (f" x{reps}" if reps > 1 else ""), d["rate"], "tab:blue"))
    ceil_p = next((c for c in r.get("producer_ceiling", []) if c.get("used_in_stepup")), None)
    if ceil_p:
        bars.append((f"producer alone\n{ceil_p['shape']}", ceil_p["rate"], "grey"))
    if st and st["max_bounded_rate"]:
        bars.append(("sustained\n(bounded)", st["max_bounded_rate"], "tab:green"))
    if od:
        bars.append(("old design\ninterval 0", od["capacity_interval_0_per_s"], "tab:red"))
        bars.append(("old design\nevery 30 s", od["design_throughput_per_s"], "darkred"))
    if bars:
        ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set_yscale("log")
        for i, b in enumerate(bars):
            ax.text(i, b[1] * 1.1, f"{b[1]:,.0f}" if b[1] >= 10 else f"{b[1]:.1f}",
                    ha="center", fontsize=8)
        ax.set_ylabel("readings per second (log)")
        ax.set_title("Throughput: ours vs the ceiling vs the old design (same run)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(r: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    plot(r, out / "results.png")
    text = summary(r)
    (out / "README.md").write_text(text)
    return text
