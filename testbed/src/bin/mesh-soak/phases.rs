//! The soak's phases (see main.rs for what each proves) and the helpers
//! they share: holding, pinging and closing the held connections over the
//! clients, connect loops and probes, checksummed streams.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use testbed::{mesh, soakload::Tally};

use crate::{
    worker,
    world::{self, certificates, log_lines, poll_slow, Soak, MARKER},
    Opts,
};

/// Connect loops: one new connection per client pod every this often.
const LOOP_INTERVAL_MS: u64 = 20;
/// A handover's or an outage's stream stays within the old agent's drain (10 s).
const SIDE_STREAM_MAX: u64 = 64 << 20;
/// Bound on opening or pinging every held connection of a client.
const HOLD_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on a probe of `--probe` connects.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// The renewal backoff tops out at 150 s: a restarted CA is asked within that.
const RENEWAL_RESUME: Duration = Duration::from_secs(200);
/// How close to expiry the CA-down window ends.
const EXPIRY_MARGIN: Duration = Duration::from_secs(4);

/// One phase's outcome: what ran, what it measured, and what went wrong.
#[derive(Debug, Default, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub fault: Option<&'static str>,
    pub seconds: f64,
    /// New connections of the connect loops during the phase.
    pub connects: Tally,
    /// Held connections alive when the phase ended (an echo on each).
    pub held_alive: u64,
    pub bytes_verified: u64,
    pub data_lost_bytes: u64,
    pub facts: serde_json::Map<String, Value>,
    pub problems: Vec<String>,
}

impl Phase {
    pub fn new(name: &'static str, fault: Option<&'static str>) -> Phase {
        Phase {
            name,
            fault,
            ..Phase::default()
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("  PROBLEM in {}: {w}", self.name);
            self.problems.push(w);
        }
    }

    fn fact(&mut self, key: &str, v: impl Serialize) {
        let v = serde_json::to_value(v).unwrap_or(Value::Null);
        eprintln!("  {}: {key} = {v}", self.name);
        self.facts.insert(key.to_string(), v);
    }
}

/// Each client's share of `n` held connections.
fn shares(s: &Soak, n: usize) -> Vec<usize> {
    let k = s.clients.len();
    (0..k).map(|i| n / k + usize::from(i < n % k)).collect()
}

/// Opens `n` held connections over the clients; returns how many opened.
fn hold(s: &mut Soak, n: usize, p: &mut Phase) -> Result<u64> {
    let parts = shares(s, n);
    let ids = s
        .clients
        .iter_mut()
        .zip(parts)
        .map(|(w, k)| w.send(json!({"op": "hold", "n": k})))
        .collect::<Result<Vec<_>>>()?;
    let mut opened = 0;
    for (w, id) in s.clients.iter_mut().zip(ids) {
        let r = w.wait(id, HOLD_TIMEOUT)?;
        opened += r["opened"].as_u64().unwrap_or(0);
        if r["tally"]["first_error"].is_string() {
            p.fact(&format!("hold_error_{}", w.pod), &r["tally"]);
        }
    }
    p.check(opened == n as u64, || format!("opened {opened} of {n} connections"));
    Ok(opened)
}

/// An echo round trip on every held connection: (alive, dead).
fn ping(s: &mut Soak) -> Result<(u64, u64, Tally)> {
    let replies = s.all(json!({"op": "ping"}), HOLD_TIMEOUT)?;
    let tally = sum(&replies);
    Ok((tally.ok, tally.failed(), tally))
}

/// The sum of the `tally` of each reply.
fn sum(replies: &[Value]) -> Tally {
    let mut t = Tally::default();
    for r in replies {
        let one: Tally = serde_json::from_value(r["tally"].clone()).unwrap_or_default();
        t.ok += one.ok;
        t.refused += one.refused;
        t.broken += one.broken;
        t.timeout += one.timeout;
        t.mismatched += one.mismatched;
        t.first_error = t.first_error.or(one.first_error);
    }
    t
}

fn probe(s: &mut Soak, n: u64) -> Result<Tally> {
    Ok(sum(&s.all(json!({"op": "probe", "n": n}), PROBE_TIMEOUT)?))
}

/// Every held connection echoes; the phase's `held_alive`.
fn expect_all_alive(s: &mut Soak, want: u64, p: &mut Phase) -> Result<()> {
    let (alive, dead, t) = ping(s)?;
    p.held_alive = alive;
    p.data_lost_bytes += t.mismatched * line_len();
    p.check(alive == want && dead == 0, || {
        format!("{alive} of {want} held connections echo, {dead} dead: {t:?}")
    });
    Ok(())
}

fn line_len() -> u64 {
    // "<marker> <8-digit id> <12-digit seq>\n"
    (MARKER.len() + 23) as u64
}

/// Loops' tallies into the phase: zero failed connects wanted when `strict`.
fn account_loops(p: &mut Phase, replies: &[Value], strict: bool) {
    let t = sum(replies);
    p.data_lost_bytes += t.mismatched * line_len();
    if strict {
        p.check(t.failed() == 0, || format!("failed connects: {t:?}"));
    }
    p.check(t.mismatched == 0, || format!("connects echoed wrong bytes: {t:?}"));
    p.check(t.ok > 0, || "the connect loops made no connection".into());
    p.connects = t;
}

/// Starts a stream of `bytes` on client `i`; its id.
fn start_stream(s: &mut Soak, i: usize, bytes: u64, seed: u64) -> Result<u64> {
    s.clients[i].send(json!({"op": "stream", "bytes": bytes, "seed": seed}))
}

/// Waits for a stream and books its bytes as verified or lost.
fn finish_stream(s: &mut Soak, i: usize, id: u64, bytes: u64, p: &mut Phase) -> Result<Value> {
    let limit = Duration::from_secs(120 + (bytes >> 20));
    let r = s.clients[i].wait(id, limit)?;
    if r["verified"] == true {
        p.bytes_verified += bytes;
    } else {
        p.data_lost_bytes += bytes;
        p.check(false, || format!("stream of {bytes} bytes not verified: {r}"));
    }
    Ok(r)
}

pub fn hold_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let t = Instant::now();
    let opened = hold(s, opts.connections, p)?;
    p.fact("open_seconds", t.elapsed().as_secs_f64());
    p.fact("opened", opened);
    expect_all_alive(s, opts.connections as u64, p)?;
    p.fact("agents_at_peak", s.rss());
    Ok(())
}

pub fn bulk_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let loops = s.start_loops(LOOP_INTERVAL_MS)?;
    let k = opts.streams.min(s.clients.len() * 4);
    let t = Instant::now();
    // Streams over the clients round robin; the last takes the remainder.
    let mut running = Vec::new();
    for j in 0..k {
        let part = opts.bytes / k as u64 + u64::from(j == k - 1) * (opts.bytes % k as u64);
        let i = j % s.clients.len();
        running.push((i, start_stream(s, i, part, 1 + j as u64)?, part));
    }
    for (i, id, part) in running {
        finish_stream(s, i, id, part, p)?;
    }
    let wall = t.elapsed().as_secs_f64();
    p.fact("streams", k);
    p.fact(
        "mib_per_s",
        (opts.bytes as f64 / (1 << 20) as f64 / wall * 10.0).round() / 10.0,
    );
    expect_all_alive(s, opts.connections as u64, p)?;
    p.fact("agents_after", s.rss());
    let replies = s.stop_loops(loops)?;
    account_loops(p, &replies, true);
    Ok(())
}

/// Lets the load run: the soak's time under a fault, not a wait for an event.
fn dwell(d: Duration) {
    std::thread::sleep(d);
}

fn side_stream_bytes(opts: &Opts) -> u64 {
    (opts.bytes / 16).clamp(1 << 20, SIDE_STREAM_MAX)
}

pub fn handover_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let n = opts.connections as u64;
    let loops = s.start_loops(LOOP_INTERVAL_MS)?;
    dwell(opts.dwell / 2);
    let side = side_stream_bytes(opts);
    let stream = start_stream(s, 0, side, 101)?;
    let new = s.start_agent(0)?;
    let mut old = std::mem::replace(&mut s.agents[0], new);
    s.wait_certs(0, Duration::from_secs(30))?;
    old.signal_term();
    poll_slow(Duration::from_secs(10), || {
        Ok((!log_lines(&old, "\"draining\"").is_empty()).then_some(()))
    })
    .context("the old agent did not start draining")?;
    // The held connections live in the draining agent: they keep echoing,
    // then close with matching checksums.
    // (within the old agent's drain timeout of 10 s).
    expect_all_alive(s, n, p)?;
    let closed = sum(&s.all(json!({"op": "close"}), HOLD_TIMEOUT)?);
    p.data_lost_bytes += closed.mismatched * line_len();
    p.check(closed.ok == n, || format!("closing through the old agent: {closed:?}"));
    finish_stream(s, 0, stream, side, p)?;
    let exit = old.wait_exit(Duration::from_secs(30))?;
    p.check(exit.success(), || format!("the old agent exited with {exit}"));
    dwell(opts.dwell / 2);
    let replies = s.stop_loops(loops)?;
    account_loops(p, &replies, true);
    let took = log_lines(&s.agents[0], "connection closed").len();
    p.check(took > 0, || "the new agent carried no connection".into());
    p.fact("new_agent_connections", took);
    // The held set again, through the new agent.
    hold(s, opts.connections, p)?;
    expect_all_alive(s, n, p)
}

pub fn kill_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let n = opts.connections as u64;
    let loops = s.start_loops(LOOP_INTERVAL_MS)?;
    // Under load: the loops run, and a full echo round on the held connections.
    dwell(opts.dwell / 2);
    expect_all_alive(s, n, p)?;
    s.agents[0].kill9();
    // New connects from the enrolled pods are refused, none goes around.
    let dead = probe(s, opts.probe)?;
    let want = opts.probe * s.clients.len() as u64;
    p.check(dead.ok == 0, || {
        format!("{} connects got through with the agent dead: {dead:?}", dead.ok)
    });
    p.check(dead.refused == want, || {
        format!("not every connect was refused: {dead:?}")
    });
    p.fact("probe_agent_dead", &dead);
    let (alive, cut, _) = ping(s)?;
    p.fact("held_cut_by_kill", cut);
    p.fact("held_survived_kill", alive);
    dwell(opts.dwell / 2);
    // Restarted from its pins: traffic resumes.
    s.agents[0] = s.start_agent(0)?;
    s.wait_certs(0, Duration::from_secs(60))?;
    let back = probe(s, opts.probe)?;
    p.check(back.ok == want, || format!("after the restart: {back:?}"));
    p.fact("probe_after_restart", &back);
    dwell(opts.dwell / 2);
    let replies = s.stop_loops(loops)?;
    // Failures are expected while the agent is dead; wrong bytes never.
    account_loops(p, &replies, false);
    let t = p.connects.clone();
    p.check(t.timeout == 0, || {
        format!("connects hung instead of being refused: {t:?}")
    });
    hold(s, n as usize - alive as usize, p)?;
    expect_all_alive(s, n, p)
}

/// Per identity: (serial, expiry) now, over both agents.
fn cert_state(s: &Soak) -> Result<Vec<(String, String, Instant)>> {
    let mut out = Vec::new();
    for a in &s.agents {
        for c in certificates(&s.cluster, &a.node)? {
            let left = Duration::from_secs(c["expires_in_s"].as_u64().unwrap_or(0));
            out.push((
                c["identity"].as_str().unwrap_or_default().to_string(),
                c["serial"].as_str().unwrap_or_default().to_string(),
                Instant::now() + left,
            ));
        }
    }
    Ok(out)
}

fn renewal_failures(s: &Soak) -> Vec<Value> {
    s.agents
        .iter()
        .flat_map(|a| log_lines(a, "cannot get a workload certificate"))
        .collect()
}

pub fn ca_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let n = opts.connections as u64;
    // No renewal due or in flight as the CA stops: every certificate has
    // more than half its lifetime left (renewal is at half-life).
    let half = Duration::from_secs(opts.cert_lifetime_s / 2 + 2);
    let before = poll_slow(Duration::from_secs(opts.cert_lifetime_s), || {
        let st = cert_state(s)?;
        let first = st.iter().map(|c| c.2).min();
        Ok(first.filter(|e| *e > Instant::now() + half).map(|_| st))
    })?;
    let expiry = before.iter().map(|c| c.2).min().context("no certificates")?;
    let failed_before = renewal_failures(s).len();
    let loops = s.start_loops(LOOP_INTERVAL_MS)?;
    s.ca.stop();
    let stopped = Instant::now();
    p.fact("ca_down_until_first_expiry_s", expiry.duration_since(stopped).as_secs());
    // A renewal comes due and fails; the still valid certificate stays.
    let failure = poll_slow(expiry.saturating_duration_since(Instant::now()), || {
        Ok(renewal_failures(s).into_iter().nth(failed_before))
    })
    .context("no renewal was attempted while the CA was down")?;
    p.check(failure["still_valid_certificate"] == true, || {
        format!("the failed renewal had no valid certificate: {failure}")
    });
    p.fact("renewal_failed_after_s", stopped.elapsed().as_secs());
    // Right up to the expiry, the old certificate carries new connections.
    let until = expiry - EXPIRY_MARGIN;
    while Instant::now() + Duration::from_secs(2) < until {
        expect_all_alive(s, n, p)?;
        std::thread::sleep(Duration::from_millis(500).min(until.saturating_duration_since(Instant::now())));
    }
    let late = probe(s, 5)?;
    p.check(late.ok == 5 * s.clients.len() as u64, || {
        format!("connects before expiry, CA down: {late:?}")
    });
    let replies = s.stop_loops(loops)?;
    account_loops(p, &replies, true);
    let unchanged = cert_state(s)?
        .iter()
        .all(|c| before.iter().any(|b| b.0 == c.0 && b.1 == c.1));
    p.check(unchanged, || "a certificate changed while the CA was down".into());
    past_expiry(s, expiry, p)?;
    // The CA is back: every identity is renewed (new serials), traffic flows.
    s.ca.restart(&s.cluster, "node1")?;
    let restarted = Instant::now();
    poll_slow(RENEWAL_RESUME, || {
        let now = cert_state(s)?;
        let renewed = before
            .iter()
            .all(|b| now.iter().any(|c| c.0 == b.0 && c.1 != b.1 && c.2 > Instant::now()));
        Ok(renewed.then_some(()))
    })
    .context("renewal did not resume after the CA came back")?;
    p.fact("renewed_after_ca_back_s", restarted.elapsed().as_secs());
    let back = probe(s, 5)?;
    p.check(back.ok == 5 * s.clients.len() as u64, || {
        format!("after renewal: {back:?}")
    });
    let (alive, _, _) = ping(s)?;
    hold(s, (n - alive) as usize, p)?;
    expect_all_alive(s, n, p)
}

/// Still without the CA, past the first expiry: what new and held
/// connections see (reported; fail closed is the design: an expired
/// certificate is no identity).
fn past_expiry(s: &mut Soak, expiry: Instant, p: &mut Phase) -> Result<()> {
    std::thread::sleep(expiry.saturating_duration_since(Instant::now()) + Duration::from_secs(2));
    let after = probe(s, 5)?;
    p.check(after.mismatched == 0, || format!("past expiry: {after:?}"));
    p.fact("probe_past_expiry", &after);
    let (alive, dead, _) = ping(s)?;
    p.fact("held_past_expiry", json!({"alive": alive, "dead": dead}));
    Ok(())
}

pub fn apiserver_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let n = opts.connections as u64;
    let loops = s.start_loops(LOOP_INTERVAL_MS)?;
    let side = side_stream_bytes(opts);
    dwell(opts.dwell / 2);
    let stream = start_stream(s, 0, side, 202)?;
    s.api.stop();
    let down = Instant::now();
    // The agents say they run on their last good state.
    let cluster = &s.cluster;
    mesh::poll(Duration::from_secs(30), || {
        let (body, _) = mesh::node_get(cluster, "node1", "http://127.0.0.1:15021/healthz/ready")?;
        Ok(body.contains("degraded").then_some(()))
    })
    .context("the agent never reported the API server gone")?;
    expect_all_alive(s, n, p)?;
    let during = probe(s, 5)?;
    p.check(during.ok == 5 * s.clients.len() as u64, || {
        format!("API down: {during:?}")
    });
    finish_stream(s, 0, stream, side, p)?;
    dwell(opts.dwell.saturating_sub(down.elapsed()));
    expect_all_alive(s, n, p)?;
    s.api.start_again()?;
    p.fact("api_down_s", down.elapsed().as_secs_f64());
    // Resynced: a pod that appears now is enrolled and gets its identity.
    // Its process first (where the agent finds its netns), then its Pod.
    let addr = world::server_addr(&s.cluster, 0);
    let cg = testbed::kube::container_cgroup(&s.cluster, "late");
    let log = s.dir.join("client-late.log");
    let mut late = worker::Worker::start(s.cluster.pod("late"), &cg, &addr, MARKER, &log)?;
    s.api.apply(&testbed::kube::pod(
        &s.cluster,
        "late",
        world::NS,
        &[("app", "late")],
        true,
    ))?;
    poll_slow(Duration::from_secs(60), || {
        let enrolled = log_lines(&s.agents[0], "pod enrolled");
        Ok(enrolled.iter().any(|l| l["pod"] == "soak/late").then_some(()))
    })
    .context("the pod added after the restart was not enrolled")?;
    s.wait_certs(0, Duration::from_secs(60))?;
    let r = late.call(json!({"op": "probe", "n": 5}), PROBE_TIMEOUT)?;
    p.check(r["tally"]["ok"] == 5, || format!("the new pod's connects: {r}"));
    let hbone = log_lines(&s.agents[0], "soak/late")
        .iter()
        .filter(|l| l["target"] == "access" && l["protocol"] == "hbone")
        .count();
    p.check(hbone >= 5, || {
        format!("{hbone} HBONE connections of the new pod in the access log")
    });
    dwell(opts.dwell / 2);
    let replies = s.stop_loops(loops)?;
    account_loops(p, &replies, true);
    expect_all_alive(s, n, p)
}

pub fn final_phase(s: &mut Soak, opts: &Opts, p: &mut Phase) -> Result<()> {
    let n = opts.connections as u64;
    expect_all_alive(s, n, p)?;
    p.fact("agents_at_end", s.rss());
    let closed = sum(&s.all(json!({"op": "close"}), HOLD_TIMEOUT)?);
    p.data_lost_bytes += closed.mismatched * line_len();
    p.check(closed.ok == n, || format!("closing with checksums: {closed:?}"));
    p.fact("closed_verified", closed.ok);
    Ok(())
}
