//! The store layer alone, SQLite against etcd in the same run: creates from 32
//! concurrent writers, then updates (compare-and-swap) and full range reads, on this
//! machine's disk. Prints each backend's throughput and latencies and etcd's ratio to
//! SQLite. etcd is a fresh single member (Debian's etcd-server, or `KRATE_ETCD`).
//!
//! `cargo bench -p krate-store --bench store` (`KRATE_BENCH_N`, default 10,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use krate_store::etcd::process::{EtcdProcess, MemberConfig};
use krate_store::etcd::EtcdStore;
use krate_store::sqlite::SqliteStore;
use krate_store::{ListRequest, Store};

const WRITERS: usize = 32;

struct Phase {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn summary(mut latencies: Vec<Duration>, elapsed: Duration) -> Phase {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Phase { rate: latencies.len() as f64 / elapsed.as_secs_f64(), p50: at(0.5), p99: at(0.99) }
}

/// `n` writes from WRITERS tasks; `update` rewrites the keys the creates made.
async fn writes(store: Arc<dyn Store>, n: usize, update: bool) -> Phase {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (w..n).step_by(WRITERS) {
                let key = format!("/registry/configmaps/default/bench-{i:06}");
                let value = Bytes::from(vec![b'x'; 300]);
                let t = Instant::now();
                if update {
                    let current = store.get(&key).await.unwrap().unwrap();
                    store.update(&key, value, current.mod_revision).await.unwrap();
                } else {
                    store.create(&key, value).await.unwrap();
                }
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    summary(all, start.elapsed())
}

async fn lists(store: Arc<dyn Store>, n: usize) -> Phase {
    let start = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let list =
            store.list(ListRequest { prefix: "/registry/configmaps/".into(), ..Default::default() }).await.unwrap();
        assert_eq!(list.items.len(), n, "every created key is listed");
        latencies.push(t.elapsed());
    }
    summary(latencies, start.elapsed())
}

fn row(what: &str, backend: &str, p: &Phase) {
    println!("| {what} | {backend} | {:.0} /s | {:.2} ms | {:.2} ms |", p.rate, ms(p.p50), ms(p.p99));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KRATE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let member = MemberConfig::single("bench", &dir.path().join("etcd"), port(), port());
    let etcd = EtcdProcess::start(member, Duration::from_secs(30)).await.expect("etcd starts");
    let etcd_store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&etcd.client_config().unwrap()).await.unwrap());
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    println!("krate store benchmark: N = {n} keys of 300 B, {WRITERS} concurrent writers, same disk");
    println!("| phase | backend | throughput | p50 | p99 |\n|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (what, kind) in [("create", 0), ("update (get + CAS)", 1), ("list all", 2)] {
        let mut phases = Vec::new();
        for (name, store) in [("sqlite", sqlite.clone()), ("etcd", etcd_store.clone())] {
            let phase = match kind {
                0 => writes(store, n, false).await,
                1 => writes(store, n, true).await,
                _ => lists(store, n).await,
            };
            row(what, name, &phase);
            phases.push(phase);
        }
        ratios.push((what, phases[1].rate / phases[0].rate));
    }
    for (what, ratio) in ratios {
        println!("{what} throughput, etcd vs SQLite: {ratio:.2}x");
    }
}
