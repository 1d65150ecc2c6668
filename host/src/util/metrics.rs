//! What this process has decided, as Prometheus metrics: decisions by
//! server and outcome, each policy's verdicts and evaluation time, the
//! chain's latency, reloads, approval endings, audit failures, and each
//! delivering sink's deliveries, failures, drops and spool size. Counting
//! takes a short lock on the message path; the text exposition is rendered
//! when scraped (`GET /metrics` on the admin listener).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

/// Upper bounds of the latency histograms' buckets, in µs.
const BUCKETS_US: &[u64] = &[
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000,
];

/// A latency histogram in µs.
#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at or below each bound of [`BUCKETS_US`].
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
}

impl Histogram {
    fn observe(&mut self, us: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS_US.len()];
        }
        for (bucket, bound) in self.buckets.iter_mut().zip(BUCKETS_US) {
            if us <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_us += us;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            let n = self.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum_us);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// By server, then outcome.
    decisions: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// By policy: verdicts, and evaluation time.
    policies: BTreeMap<String, PolicyCounts>,
    chain_latency: Histogram,
    reloads: BTreeMap<String, u64>,
    approvals: BTreeMap<&'static str, u64>,
    audit_failures: u64,
    /// What the HTTP listeners refused or survived, by event.
    listener: BTreeMap<&'static str, u64>,
    /// By delivering sink (its URL or name).
    deliveries: BTreeMap<String, DeliveryCounts>,
    /// Server connections of sessions' or agents' own running, by server.
    server_instances: BTreeMap<String, u64>,
    /// This process' name among the deployment's replicas.
    replica: Option<String>,
}

#[derive(Debug, Default)]
struct DeliveryCounts {
    delivered: u64,
    failures: u64,
    dropped: u64,
    /// Bytes in the spool waiting to be delivered.
    backlog: u64,
}

#[derive(Debug, Default)]
struct PolicyCounts {
    verdicts: BTreeMap<&'static str, u64>,
    latency: Histogram,
}

/// The entry for `key`, made only the first time (no allocation after).
fn entry<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("just inserted")
}

/// This process' metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

/// The process' metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// One policy's part in a decision.
pub struct Verdict<'a> {
    /// The policy.
    pub policy: &'a str,
    /// Its verdict (`allow`, `deny`, …).
    pub verdict: &'static str,
    /// How long it took, in µs.
    pub latency_us: u64,
}

impl Metrics {
    /// A message to or from `server` decided as `outcome` by the chain in
    /// `latency_us`, with each policy's verdict.
    pub fn decision<'a>(
        &self,
        server: &str,
        outcome: &'static str,
        latency_us: u64,
        verdicts: impl Iterator<Item = Verdict<'a>>,
    ) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        *entry(&mut counts.decisions, server)
            .entry(outcome)
            .or_default() += 1;
        counts.chain_latency.observe(latency_us);
        for v in verdicts {
            let policy = entry(&mut counts.policies, v.policy);
            *policy.verdicts.entry(v.verdict).or_default() += 1;
            policy.latency.observe(v.latency_us);
        }
    }

    /// A reload attempt that came to `result` (`ok`, `unchanged`, `failed`).
    pub fn reload(&self, result: &str) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        *entry(&mut counts.reloads, result) += 1;
    }

    /// A held call's approval ended as `state`.
    pub fn approval(&self, state: &'static str) {
        *self
            .counts
            .lock()
            .expect("metrics lock poisoned")
            .approvals
            .entry(state)
            .or_default() += 1;
    }

    /// An audit record could not be written.
    pub fn audit_failure(&self) {
        self.counts
            .lock()
            .expect("metrics lock poisoned")
            .audit_failures += 1;
    }

    /// Something an HTTP listener refused or survived: `accept-error`
    /// (e.g. out of file descriptors), `slow-client` (headers or body not
    /// sent in time), `at-capacity` (a connection waited for a free slot).
    pub fn listener(&self, event: &'static str) {
        *self
            .counts
            .lock()
            .expect("metrics lock poisoned")
            .listener
            .entry(event)
            .or_default() += 1;
    }

    /// `records` delivered by the delivering sink `sink`.
    pub fn audit_delivered(&self, sink: &str, records: u64) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        entry(&mut counts.deliveries, sink).delivered += records;
    }

    /// A failed delivery attempt of `sink`.
    pub fn audit_delivery_failed(&self, sink: &str) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        entry(&mut counts.deliveries, sink).failures += 1;
    }

    /// A record `sink` dropped (its spool was full).
    pub fn audit_dropped(&self, sink: &str) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        entry(&mut counts.deliveries, sink).dropped += 1;
    }

    /// The bytes waiting in `sink`'s spool now.
    pub fn audit_backlog(&self, sink: &str, bytes: u64) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        entry(&mut counts.deliveries, sink).backlog = bytes;
    }

    /// `running` connections of sessions' or agents' own to `server` now.
    /// Names this process among the deployment's replicas.
    pub fn replica(&self, name: &str) {
        let mut counts = self.counts.lock().expect("metrics poisoned");
        counts.replica = Some(name.to_string());
    }

    pub fn server_instances(&self, server: &str, running: u64) {
        let mut counts = self.counts.lock().expect("metrics lock poisoned");
        counts.server_instances.insert(server.to_string(), running);
    }

    /// The Prometheus text exposition, with `pending` approvals waiting in
    /// the store.
    pub fn render(&self, pending: Option<u64>) -> String {
        let counts = self.counts.lock().expect("metrics lock poisoned");
        let mut out = String::new();
        let name = "portcullis_decisions_total";
        header(
            &mut out,
            name,
            "counter",
            "Messages judged, by server and outcome.",
        );
        for (server, outcomes) in &counts.decisions {
            let server = escape(server);
            for (outcome, n) in outcomes {
                let _ = writeln!(
                    out,
                    "{name}{{server=\"{server}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        let name = "portcullis_policy_verdicts_total";
        header(
            &mut out,
            name,
            "counter",
            "Verdicts, by policy and verdict.",
        );
        for (policy, counted) in &counts.policies {
            let policy = escape(policy);
            for (verdict, n) in &counted.verdicts {
                let _ = writeln!(
                    out,
                    "{name}{{policy=\"{policy}\",verdict=\"{verdict}\"}} {n}"
                );
            }
        }
        let name = "portcullis_chain_latency_microseconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time the policy chain took per message, in µs.",
        );
        counts.chain_latency.render(&mut out, name, "");
        let name = "portcullis_policy_latency_microseconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time each policy took per evaluation, in µs.",
        );
        for (policy, counted) in &counts.policies {
            let labels = format!("policy=\"{}\"", escape(policy));
            counted.latency.render(&mut out, name, &labels);
        }
        let name = "portcullis_reloads_total";
        header(&mut out, name, "counter", "Reload attempts, by result.");
        for (result, n) in &counts.reloads {
            let _ = writeln!(out, "{name}{{result=\"{}\"}} {n}", escape(result));
        }
        let name = "portcullis_approvals_total";
        header(
            &mut out,
            name,
            "counter",
            "Held calls' approvals that ended, by state.",
        );
        for (state, n) in &counts.approvals {
            let _ = writeln!(out, "{name}{{state=\"{state}\"}} {n}");
        }
        let name = "portcullis_audit_failures_total";
        let help = "Audit records that could not be written (their messages were refused).";
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", counts.audit_failures);
        let name = "portcullis_listener_events_total";
        let help = "What the HTTP listeners refused or survived, by event.";
        header(&mut out, name, "counter", help);
        for (event, n) in &counts.listener {
            let _ = writeln!(out, "{name}{{event=\"{event}\"}} {n}");
        }
        let families: [(&str, &str, &str, Count); 4] = [
            (
                "portcullis_audit_delivered_total",
                "counter",
                "Records a delivering sink delivered.",
                |d| d.delivered,
            ),
            (
                "portcullis_audit_delivery_failures_total",
                "counter",
                "Failed delivery attempts, by sink.",
                |d| d.failures,
            ),
            (
                "portcullis_audit_dropped_total",
                "counter",
                "Records dropped because a sink's spool was full.",
                |d| d.dropped,
            ),
            (
                "portcullis_audit_spool_bytes",
                "gauge",
                "Bytes of records waiting in a delivering sink's spool (its queue).",
                |d| d.backlog,
            ),
        ];
        for (name, kind, help, value) in families {
            header(&mut out, name, kind, help);
            for (sink, counted) in &counts.deliveries {
                let _ = writeln!(
                    out,
                    "{name}{{sink=\"{}\"}} {}",
                    escape(sink),
                    value(counted)
                );
            }
        }
        let name = "portcullis_server_instances";
        let help = "Server connections of sessions' or agents' own running, by server.";
        header(&mut out, name, "gauge", help);
        for (server, n) in &counts.server_instances {
            let _ = writeln!(out, "{name}{{server=\"{}\"}} {n}", escape(server));
        }
        if let Some(replica) = &counts.replica {
            let name = "portcullis_replica_info";
            header(
                &mut out,
                name,
                "gauge",
                "This process' name among the deployment's replicas.",
            );
            let _ = writeln!(out, "{name}{{replica=\"{}\"}} 1", escape(replica));
        }
        if let Some(pending) = pending {
            let name = "portcullis_approvals_pending";
            header(
                &mut out,
                name,
                "gauge",
                "Held calls waiting for a decision.",
            );
            let _ = writeln!(out, "{name} {pending}");
        }
        out
    }
}

/// Reads one count of a delivering sink.
type Count = fn(&DeliveryCounts) -> u64;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the exposition format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_and_latencies_render_as_prometheus_text() {
        let metrics = Metrics::default();
        let verdicts = || {
            [Verdict {
                policy: "read-only",
                verdict: "allow",
                latency_us: 3,
            }]
            .into_iter()
        };
        metrics.decision("fs", "allow", 4, verdicts());
        metrics.decision("fs", "allow", 40, verdicts());
        metrics.decision("fs\"x", "deny", 4, std::iter::empty());
        metrics.reload("ok");
        metrics.approval("approved");
        metrics.listener("accept-error");
        metrics.server_instances("everything", 3);
        metrics.replica("replica-a");
        let text = metrics.render(Some(2));
        for line in [
            "portcullis_replica_info{replica=\"replica-a\"} 1",
            "portcullis_server_instances{server=\"everything\"} 3",
            "portcullis_decisions_total{server=\"fs\",outcome=\"allow\"} 2",
            "portcullis_decisions_total{server=\"fs\\\"x\",outcome=\"deny\"} 1",
            "portcullis_policy_verdicts_total{policy=\"read-only\",verdict=\"allow\"} 2",
            "portcullis_chain_latency_microseconds_bucket{le=\"5\"} 2",
            "portcullis_chain_latency_microseconds_bucket{le=\"50\"} 3",
            "portcullis_chain_latency_microseconds_bucket{le=\"+Inf\"} 3",
            "portcullis_chain_latency_microseconds_sum 48",
            "portcullis_policy_latency_microseconds_count{policy=\"read-only\"} 2",
            "portcullis_reloads_total{result=\"ok\"} 1",
            "portcullis_approvals_total{state=\"approved\"} 1",
            "portcullis_approvals_pending 2",
            "portcullis_listener_events_total{event=\"accept-error\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
