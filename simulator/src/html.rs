//! The report as one HTML page a person can open: the summary tables, and charts (inline SVG,
//! no scripts) of each VM's recovery point over time, its pending bytes, and each link's use.

use crate::report::Report;
use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 160.0;
/// Series points further apart than this are not joined by a line.
const GAP_SECONDS: f64 = 120.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart of `(x, y)` points over `0..x_end`, with its largest value labelled.
fn chart(title: &str, unit: &str, x_end: f64, points: &[(f64, f64)]) -> String {
    let y_max = points
        .iter()
        .map(|point| point.1)
        .fold(0.0, f64::max)
        .max(1e-9);
    let x_end = x_end.max(1.0);
    let mut path = String::new();
    let mut previous: Option<f64> = None;
    for (x, y) in points {
        let px = x / x_end * WIDTH;
        let py = HEIGHT - y / y_max * (HEIGHT - 10.0);
        // Points come a minute apart; a longer gap (nothing to measure) is left blank.
        let joined = previous.is_some_and(|before| x - before <= GAP_SECONDS);
        let _ = write!(path, "{}{px:.1},{py:.1}", if joined { " L" } else { " M" });
        previous = Some(*x);
    }
    format!(
        "<figure><figcaption>{} (max {:.1} {})</figcaption>\
         <svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\">\
         <rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#f8f8f8\" stroke=\"#ccc\"/>\
         <path d=\"{path}\" fill=\"none\" stroke=\"#2a6fb0\" stroke-width=\"1.5\"/></svg>\
         <div class=\"axis\">0 h … {:.1} h</div></figure>",
        escape(title),
        y_max,
        unit,
        x_end / 3600.0
    )
}

pub fn html(report: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>blockrep simulation: {}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:60em}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}\
         td{{white-space:nowrap}}th:first-child,td:first-child{{text-align:left}}.bad{{color:#b00}}.axis{{font-size:small;color:#666}}\
         figure{{margin:1em 0}}</style></head><body>",
        escape(&report.scenario)
    );
    let _ = write!(
        out,
        "<h1>{}</h1><p>Seed {}, {:.1} simulated hours in {:.1} s, {} events, trace hash <code>{}</code>.</p>",
        escape(&report.scenario),
        report.seed,
        report.simulated_seconds / 3600.0,
        report.real_seconds,
        report.events,
        report.trace_hash
    );
    if report.violations.is_empty() {
        out.push_str("<p>Every invariant held.</p>");
    } else {
        out.push_str("<h2 class=\"bad\">Violations</h2><ul>");
        for violation in &report.violations {
            let _ = write!(
                out,
                "<li class=\"bad\">{}</li>",
                escape(&violation.to_string())
            );
        }
        out.push_str("</ul>");
    }
    out.push_str(
        "<h2>Virtual machines</h2><table><tr><th>VM</th><th>primary → replica</th>\
         <th>frequency</th><th>RPO p50</th><th>p99</th><th>max</th><th>written</th>\
         <th>shipped</th><th>compression</th><th>applied</th><th>missed</th><th>state</th></tr>",
    );
    for vm in &report.vms {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{} → {}</td><td>{} s</td><td>{:.0} s</td><td>{:.0} s</td>\
             <td>{:.0} s</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&vm.name),
            escape(&vm.primary_host),
            escape(&vm.replica_host),
            vm.frequency_seconds,
            vm.rpo_seconds.p50,
            vm.rpo_seconds.p99,
            vm.rpo_seconds.max,
            blockrep::units::format_size(vm.bytes_written),
            blockrep::units::format_size(vm.disk_bytes_shipped),
            vm.compression_ratio,
            vm.deltas_applied,
            vm.missed_cycles,
            escape(&vm.final_state)
        );
    }
    out.push_str("</table>");
    failovers(&mut out, report);
    if !report.faults.is_empty() {
        out.push_str("<h2>Faults injected</h2><ul>");
        for (seconds, what) in &report.faults {
            let _ = write!(out, "<li>{:.0} s: {}</li>", seconds, escape(what));
        }
        out.push_str("</ul>");
    }
    out.push_str("<h2>Charts</h2>");
    for vm in &report.vms {
        let _ = write!(out, "<h3>{}</h3>", escape(&vm.name));
        out.push_str(&chart(
            "recovery point age",
            "s",
            report.simulated_seconds,
            &vm.rpo_series,
        ));
        let pending: Vec<(f64, f64)> = vm
            .pending_series
            .iter()
            .map(|(x, bytes)| (*x, *bytes as f64 / (1 << 20) as f64))
            .collect();
        out.push_str(&chart(
            "pending bytes",
            "MiB",
            report.simulated_seconds,
            &pending,
        ));
        let health: Vec<String> = vm
            .health
            .iter()
            .map(|change| format!("{:.0} s {}", change.seconds, change.health))
            .collect();
        let _ = write!(out, "<p>Health: {}</p>", escape(&health.join(", ")));
    }
    for link in &report.links {
        let use_per_minute: Vec<(f64, f64)> = link.carried_per_minute[0]
            .iter()
            .enumerate()
            .map(|(minute, bytes)| {
                (
                    minute as f64 * 60.0,
                    *bytes as f64 / (link.bandwidth_bytes * 60.0) * 100.0,
                )
            })
            .collect();
        out.push_str(&chart(
            &format!("link {} → {} use", link.ends.0, link.ends.1),
            "%",
            report.simulated_seconds,
            &use_per_minute,
        ));
    }
    out.push_str("</body></html>\n");
    out
}

/// The failover steps as a table, and what each verification found.
fn failovers(out: &mut String, report: &Report) {
    if !report.failovers.is_empty() {
        out.push_str(
            "<h2>Failovers</h2><table><tr><th>time</th><th>VM</th><th>kind</th>\
             <th>from → to</th><th>point</th><th>lost</th><th>plan</th><th>networks</th>\
             <th>problem</th></tr>",
        );
        for failover in &report.failovers {
            let _ = write!(
                out,
                "<tr><td>{:.0} s</td><td>{}</td><td>{}</td><td>{} → {}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                failover.seconds,
                escape(&failover.vm),
                escape(&failover.kind),
                escape(&failover.from),
                escape(&failover.to),
                failover
                    .point
                    .map(|point| point.to_string())
                    .unwrap_or_default(),
                blockrep::units::format_size(failover.lost_bytes),
                escape(failover.plan.as_deref().unwrap_or("")),
                escape(&failover.networks.join("; ")),
                escape(failover.problem.as_deref().unwrap_or("")),
            );
        }
        out.push_str("</table>");
    }
    if !report.verifications.is_empty() {
        out.push_str("<h2>Verifications</h2><ul>");
        for verification in &report.verifications {
            let found = match (&verification.differing, &verification.problem) {
                (Some(ranges), _) if ranges.is_empty() => "equal".to_owned(),
                (Some(ranges), _) => ranges
                    .iter()
                    .map(|(disk, start, end)| format!("disk {disk} bytes {start}..{end} differ"))
                    .collect::<Vec<_>>()
                    .join(", "),
                (None, problem) => format!("not compared: {}", problem.as_deref().unwrap_or("")),
            };
            let _ = write!(
                out,
                "<li>{:.0} s, {}: {}</li>",
                verification.seconds,
                escape(&verification.vm),
                escape(&found)
            );
        }
        out.push_str("</ul>");
    }
}
