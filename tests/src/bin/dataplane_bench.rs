//! ns/packet of the balancer through BPF_PROG_TEST_RUN, net of a trivial XDP_PASS program
//! measured in the same run. Every call gets a fresh frame (repeat = 1: with a larger
//! repeat the kernel reuses the buffer, so the program would see its own encapsulated
//! output), and every return value is checked. Time is the kernel's own per-program
//! accounting (BPF_ENABLE_STATS: run_time_ns / run_cnt), which excludes the syscall.
//!
//! Run as root: `cargo xtask bench` (or `cargo run --release -p tests --bin dataplane-bench`).
//! `LB_BENCH_BASELINE=<object>` also measures another build of the balancer object (same
//! maps) in the same chunks and prints this build's time relative to it.

use aya::{programs::Xdp, sys::{enable_stats, Stats}, Ebpf};
use lb_common::{
    builder::Pkt,
    packet::{TCP_ACK, TCP_SYN},
};
use lb_userspace::{
    objects,
    testrun::{self, XDP_DROP, XDP_PASS, XDP_TX},
    Dataplane, LoadOptions,
};
use tests::{lab::*, pin_to_cpu};

/// The measured paths (`LB_BENCH_PATHS` names), and Katran on this machine kind, same
/// method, net of the floor (from the issue). "ack1" is the established path in the shape
/// Katran's own tester measures it (one fixture packet, repeated: the flow's entry stays in
/// the cache); "ack" is the busy balancer's shape (256 flows in turn, the entry usually
/// out of the cache). The issue does not say which shape its Katran figure had. The "fw"
/// paths run through a second balancer with a blocklist of `FW_RULES` deny rules (Katran
/// has no firewall): the same packets as "ack" and "plain" from sources no rule holds (the
/// common case: the lookup finds nothing), packets from a source denied by a rule of /16
/// or shorter (decided by the direct table) and by a longer one (by the trie); each is
/// compared with its path without rules.
const PATHS: [(&str, &str, Option<f64>); 8] = [
    ("syn", "new flow (SYN to VIP)", Some(320.0)),
    ("ack", "established (ACK to VIP)", Some(125.0)),
    ("ack1", "established, one flow", Some(125.0)),
    ("plain", "non-VIP TCP", Some(45.0)),
    ("fwack", "established, blocklist", None),
    ("fwplain", "non-VIP TCP, blocklist", None),
    ("fwdrop", "denied by a /15, dropped", None),
    ("fwtrie", "denied by a /24, dropped", None),
];
/// For each "fw" path, the path without rules it is compared with.
const FW_BASE: [usize; 4] = [1, 3, 3, 3];
/// Deny rules of the benchmark's blocklist: about Spamhaus DROP's size.
const FW_RULES: usize = 1500;

/// A blocklist of `FW_RULES` random /12../24 prefixes outside the benchmark's own sources
/// (10/8, 100/8, 172.16/12), and 198.18.0.0/15 and 198.51.100.0/24, which the "fwdrop" and
/// "fwtrie" packets come from.
fn blocklist() -> Vec<lb_common::firewall::Rule> {
    use lb_common::firewall::{Prefix, Rule};
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rules = std::collections::BTreeSet::new();
    rules.insert(Rule { prefix: Prefix::new([198, 51, 100, 0], 24).unwrap(), allow: false });
    rules.insert(Rule { prefix: Prefix::new([198, 18, 0, 0], 15).unwrap(), allow: false });
    while rules.len() < FW_RULES {
        // xorshift64*: a fixed list, the same in every run.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let len = 12 + (r >> 59) as u8 % 13;
        let addr = ((r as u32) & Prefix::mask(len)).to_be_bytes();
        if matches!(addr[0], 10 | 100 | 172 | 198) {
            continue;
        }
        rules.insert(Rule { prefix: Prefix::new(addr, len).unwrap(), allow: false });
    }
    rules.into_iter().collect()
}

struct Scenario {
    frames: Vec<Vec<u8>>,
    expect: u32,
}

/// Runs every frame once through `prog`; returns ns per packet from the kernel's stats.
fn measure(prog: &Xdp, s: &Scenario, ingress: u32) -> f64 {
    let before = prog.info().expect("prog info");
    let mut kernel_ns = 0u128;
    for f in &s.frames {
        let got = testrun::run(prog, f, Some(ingress)).expect("test run");
        kernel_ns += got.duration.as_nanos();
        assert_eq!(got.action, s.expect, "unexpected action: the benchmark would measure the wrong path");
    }
    let after = prog.info().expect("prog info");
    let runs = after.run_count() - before.run_count();
    if std::env::var("LB_BENCH_DEBUG").is_ok() { eprintln!("test_run duration avg {:.1} ns", kernel_ns as f64 / runs as f64); }
    assert_eq!(runs, s.frames.len() as u64, "bpf_stats must count every run");
    (after.run_time() - before.run_time()).as_nanos() as f64 / runs as f64
}

/// The flow table the daemon has by default (LB_BENCH_FLOWS to change): the run opens more
/// flows than it holds, so new flows replace old ones, as on a balancer that has run a while.
fn flow_table_size() -> u32 {
    std::env::var("LB_BENCH_FLOWS").ok().and_then(|s| s.parse().ok()).unwrap_or(lb_common::flow::DEFAULT_FLOW_TABLE_SIZE)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("dataplane-bench needs root (BPF_PROG_TEST_RUN, BPF_ENABLE_STATS); run `sudo -E cargo xtask bench`");
        std::process::exit(2);
    }
    let per_round: usize = std::env::var("LB_BENCH_PACKETS").ok().and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let rounds = 7;
    let cpu: usize = std::env::var("LB_BENCH_CPU").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    pin_to_cpu(cpu);
    let ingress = topology();
    let mut dp = Dataplane::load(&LoadOptions { flow_table_size: flow_table_size(), pin_dir: None, flow_seed: None }).expect("load balancer");
    configure(&mut dp);
    // As lbd runs it, the flood guard on (a count per SYN), but with a limit the run never
    // reaches: the run's SYNs, more than 125,000 (lbd's default) in some seconds, would
    // otherwise engage it, and SYNs past it (no entry) are another path. The counters below
    // show that it never engaged.
    dp.set_flood_limit(u32::MAX).expect("flood guard");
    // LB_BENCH_BASELINE=<balancer object> (e.g. a copy of target/release/build/lb-userspace-*/out/lb
    // from before a change): measured beside this build, chunk by chunk, as the floor is.
    // Separate runs cannot resolve 10 % on a shared host; this can.
    let baseline_path = std::env::var("LB_BENCH_BASELINE").ok();
    let baseline = baseline_path.as_ref().map(|path| {
        let object = std::fs::read(path).unwrap_or_else(|e| panic!("LB_BENCH_BASELINE {path}: {e}"));
        let mut b = Dataplane::load_object(&object, &LoadOptions { flow_table_size: flow_table_size(), pin_dir: None, flow_seed: None })
            .unwrap_or_else(|e| panic!("LB_BENCH_BASELINE {path}: {e}"));
        configure(&mut b);
        b.set_flood_limit(u32::MAX).expect("flood guard");
        b
    });
    // LB_BENCH_PATHS=syn,ack,ack1,plain,... (any subset) measures only those paths: for profiling one.
    let paths = std::env::var("LB_BENCH_PATHS").unwrap_or_else(|_| PATHS.map(|(p, _, _)| p).join(","));
    let wanted = PATHS.map(|(p, _, _)| paths.split(',').any(|w| w.trim() == p));
    // The same balancer with a blocklist, for the "fw" paths (only loaded for them).
    let fw = wanted[4..].iter().any(|&w| w).then(|| {
        let mut fw = Dataplane::load(&LoadOptions { flow_table_size: flow_table_size(), pin_dir: None, flow_seed: None }).expect("load balancer");
        configure(&mut fw);
        fw.set_flood_limit(u32::MAX).expect("flood guard");
        fw.set_firewall(&blocklist()).expect("blocklist");
        fw
    });
    let mut floor_obj = Ebpf::load(objects::pass()).expect("load pass object");
    let floor: &mut Xdp = floor_obj.program_mut("xdp_pass").unwrap().try_into().unwrap();
    floor.load().expect("load xdp_pass");
    let _stats = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");

    // Established flows: 256 flows opened once, then their ACKs (LB_BENCH_EST_FLOWS to
    // change): between two packets of one flow come 255 others and as many test-run calls,
    // so the flow's line is usually out of the cache, as on a busy balancer.
    let n_est: u32 = std::env::var("LB_BENCH_EST_FLOWS").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let est_flows: Vec<(u32, u16)> = (0..n_est).map(|i| (i, 10_000 + (i % 50_000) as u16)).collect();
    for &(i, port) in &est_flows {
        let src = [172, 17, (i >> 8) as u8, i as u8];
        for d in std::iter::once(&dp).chain(fw.as_ref()).chain(baseline.as_ref()) {
            testrun::run(d.program(), &Pkt::tcp(src, port, VIP, 80, TCP_SYN).build(), Some(ingress)).unwrap();
        }
    }
    let ack: Vec<Vec<u8>> = est_flows
        .iter()
        .map(|&(i, port)| Pkt::tcp([172, 17, (i >> 8) as u8, i as u8], port, VIP, 80, TCP_ACK).payload(&[0x55; 64]).build())
        .collect();
    let non_vip: Vec<Vec<u8>> = (0..4096u32)
        .map(|i| Pkt::tcp([172, 18, (i >> 8) as u8, i as u8], 30_000, [10, 0, 0, 1], 22, TCP_ACK).payload(&[0x55; 64]).build())
        .collect();

    let denied: Vec<Vec<u8>> = (0..256u32).map(|i| Pkt::tcp([198, 18 + (i & 1) as u8, (i >> 1) as u8, i as u8], 30_000, VIP, 80, TCP_SYN).build()).collect();
    let denied_trie: Vec<Vec<u8>> = (0..256u32).map(|i| Pkt::tcp([198, 51, 100, i as u8], 30_000, VIP, 80, TCP_SYN).build()).collect();


    // The machine's speed drifts (shared host): alternate short chunks of every path and
    // compare like with like, chunk by chunk; report the median and the 10th percentile.
    let mut results: [Vec<f64>; 9] = Default::default();
    let mut base_results: [Vec<f64>; 4] = Default::default();
    let mut syn_src = 0u32;
    let chunk = per_round.min(2000);
    let chunks = (per_round * rounds / chunk).max(20);
    for c in 0..chunks {
        // New flows: a 5-tuple never seen before on every call.
        let syns = Scenario {
            frames: (0..chunk)
                .map(|_| {
                    syn_src += 1;
                    let src = [100, (syn_src >> 16) as u8, (syn_src >> 8) as u8, syn_src as u8];
                    Pkt::tcp(src, 40_000 + (syn_src % 1000) as u16, VIP, 80, TCP_SYN).build()
                })
                .collect(),
            expect: XDP_TX,
        };
        let acks = Scenario { frames: (0..chunk).map(|i| ack[(c * chunk + i) % ack.len()].clone()).collect(), expect: XDP_TX };
        let one_flow = Scenario { frames: (0..chunk).map(|_| ack[0].clone()).collect(), expect: XDP_TX };
        let plain = Scenario { frames: (0..chunk).map(|i| non_vip[(c * chunk + i) % non_vip.len()].clone()).collect(), expect: XDP_PASS };
        results[0].push(measure(floor, &plain, ingress));
        let drops = Scenario { frames: (0..chunk).map(|i| denied[(c * chunk + i) % denied.len()].clone()).collect(), expect: XDP_DROP };
        let trie_drops = Scenario { frames: (0..chunk).map(|i| denied_trie[(c * chunk + i) % denied_trie.len()].clone()).collect(), expect: XDP_DROP };
        for (k, s) in [(5, &acks), (6, &plain), (7, &drops), (8, &trie_drops)] {
            if wanted[k - 1] {
                results[k].push(measure(fw.as_ref().expect("loaded for the fw paths").program(), s, ingress));
            }
        }
        for (k, s) in [(1, &syns), (2, &acks), (3, &one_flow), (4, &plain)] {
            if wanted[k - 1] {
                // With a baseline, which of the two goes first alternates by chunk: the
                // second runs on caches the first warmed.
                let base_first = c % 2 == 1;
                if let (Some(b), true) = (&baseline, base_first) {
                    base_results[k - 1].push(measure(b.program(), s, ingress));
                }
                results[k].push(measure(dp.program(), s, ingress));
                if let (Some(b), false) = (&baseline, base_first) {
                    base_results[k - 1].push(measure(b.program(), s, ingress));
                }
            }
        }
    }
    let pct = |v: &[f64], p: f64| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() - 1) as f64 * p) as usize]
    };
    println!(
        "XDP data plane, BPF_PROG_TEST_RUN, fresh frame per call, {chunks} chunks x {chunk} packets per path, \
         ns/packet from bpf_stats (run_time_ns / run_cnt), CPU {cpu}"
    );
    println!("{:<28} {:>8} {:>8} {:>9} {:>9} {:>11} {:>12} {:>10}", "path", "p50", "p10", "net p50", "net p10", "Katran net", "ours/Katran", "target");
    let (f50, f10) = (pct(&results[0], 0.5), pct(&results[0], 0.1));
    println!("{:<28} {:>8.1} {:>8.1} {:>9} {:>9} {:>11} {:>12} {:>10}", "floor: XDP_PASS program", f50, f10, "-", "-", "-", "-", "-");
    let net50 = |k: usize| (pct(&results[k + 1], 0.5) - f50).max(0.0);
    for (k, (_, name, katran)) in PATHS.iter().enumerate() {
        if !wanted[k] {
            continue;
        }
        let (p50, p10) = (pct(&results[k + 1], 0.5), pct(&results[k + 1], 0.1));
        let (n50, n10) = ((p50 - f50).max(0.0), (p10 - f10).max(0.0));
        match katran {
            Some(katran) => {
                let ratio = n50 / katran;
                println!(
                    "{name:<28} {p50:>8.1} {p10:>8.1} {n50:>9.1} {n10:>9.1} {katran:>11.0} {ratio:>12.2} {:>10}",
                    if ratio <= 0.5 { "<= 0.5 ok" } else { "> 0.5 MISS" }
                );
            }
            None => {
                let base = FW_BASE[k - 4];
                let versus = if wanted[base] { format!("{:+.1} ns vs {}", n50 - net50(base), PATHS[base].0) } else { "-".into() };
                println!("{name:<28} {p50:>8.1} {p10:>8.1} {n50:>9.1} {n10:>9.1} {:>11} {:>12} {versus}", "-", "-");
            }
        }
    }
    if wanted[4..].iter().any(|&w| w) {
        println!("(blocklist: {FW_RULES} deny rules, /12 to /24: direct table of /16 blocks, then the kernel's LPM trie; the fw paths' sources match none but the dropped ones)");
    }
    if let Some(path) = &baseline_path {
        println!("this build vs LB_BENCH_BASELINE={path}, same chunks (ratio < 1: this build is faster)");
        println!("{:<28} {:>13} {:>13} {:>18}", "path", "base net p50", "this net p50", "this/base per chunk");
        for (k, (_, name, _)) in PATHS.iter().enumerate().take(4) {
            if !wanted[k] {
                continue;
            }
            // Net of the floor chunk by chunk, then the median of the per-chunk ratios.
            let net = |v: &[f64]| v.iter().zip(&results[0]).map(|(x, f)| (x - f).max(1.0)).collect::<Vec<_>>();
            let (this, base) = (net(&results[k + 1]), net(&base_results[k]));
            let ratios: Vec<f64> = this.iter().zip(&base).map(|(t, b)| t / b).collect();
            println!("{name:<28} {:>13.1} {:>13.1} {:>17.2}x", pct(&base, 0.5), pct(&this, 0.5), pct(&ratios, 0.5));
        }
    }
    let g = dp.global_stats().unwrap();
    use lb_common::stats::Counter;
    println!(
        "(counters: {} new flows, {} flow hits, {} not-VIP, {} SYNs past the flood guard)",
        g.get(Counter::NewFlow),
        g.get(Counter::FlowHit),
        g.get(Counter::NotVip),
        g.get(Counter::FloodGuard)
    );
}
