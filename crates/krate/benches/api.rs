//! API server benchmark: create, get, list and watch throughput and latency for N
//! ConfigMaps through a real `krate server` (kube-rs client over HTTPS), beside the same
//! bytes inserted straight into SQLite with the same settings in the same run. Also the
//! server's resident memory at N and 10×N objects. And the cost of authorization:
//! creates and gets as a service account that a RoleBinding lets write ConfigMaps
//! (RBAC decides), beside the same as the admin certificate (`system:masters`, decided
//! before RBAC is asked), in the same run.
//!
//!     cargo bench -p krate --bench api            # N = 10,000
//!     KRATE_BENCH_N=2000 cargo bench -p krate --bench api
//!     KRATE_BENCH_AUTHZ_ONLY=1 cargo bench -p krate --bench api   # authorization only
//!
//! Prints a report; numbers are recorded in BENCHMARKS.md.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{run_with, BenchServer, Stats};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

const CONCURRENCY: usize = 32;
/// How many times the authorization rounds read each object they created.
const GET_PASSES: usize = 5;
/// Rounds of the authorization comparison, alternating admin and service account.
const AUTHZ_ROUNDS: usize = 7;

fn configmap(i: usize) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": format!("bench-{i:06}"), "labels": {"app": "bench", "shard": (i % 16).to_string()}},
        "data": {"key": "value", "payload": "x".repeat(200), "index": i.to_string()},
    }))
    .unwrap()
}

/// Runs `op(i)` for i in range with CONCURRENCY workers, timing each call.
async fn run<F, Fut>(range: std::ops::Range<usize>, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    run_with(CONCURRENCY, range, op).await
}

/// Rounds of `m` creates then `m` gets of ConfigMaps, as the admin and as a service
/// account bound to a Role that allows exactly that: [create, get] each, median rounds.
async fn authorization(server: &BenchServer, m: usize) -> ([Stats; 2], [Stats; 2], [f64; 2]) {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let admin = server.client.clone();
    let post = PostParams::default();
    for ns in ["bench-admin", "bench-rbac"] {
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(admin.clone()).create(&post, &namespace).await.unwrap();
    }
    let ns = "bench-rbac";
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "writer"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), ns).create(&post, &account).await.unwrap();
    let role: Role = serde_json::from_value(json!({"metadata": {"name": "configmaps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get"]}]}))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns).create(&post, &role).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "writer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmaps"},
        "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": ns}]}))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns).create(&post, &binding).await.unwrap();
    let request: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": []}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request("writer", &post, &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("the TokenRequest issues a token");
    let bound = server.client_with_token(&token).await;
    // The binding counts once the cache has it.
    let probe: Api<ConfigMap> = Api::namespaced(bound.clone(), ns);
    while probe.get_opt("probe").await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let phase = |client: kube::Client, ns: &'static str, round: usize| async move {
        let api: Api<ConfigMap> = Api::namespaced(client, ns);
        let creates = api.clone();
        let range = round * m..(round + 1) * m;
        let create = run(range.clone(), move |i| {
            let api = creates.clone();
            async move {
                api.create(&PostParams::default(), &configmap(i)).await.unwrap();
            }
        })
        .await;
        // Each object is read GET_PASSES times, so that a round of gets lasts long
        // enough (m gets alone take about a tenth of a second) to measure steadily.
        let get = run(0..m * GET_PASSES, move |i| {
            let api = api.clone();
            let i = range.start + i % m;
            async move {
                api.get(&format!("bench-{i:06}")).await.unwrap();
            }
        })
        .await;
        [create, get]
    };
    // Rounds alternate between the two, so that drift and warm-up hit both alike; each
    // side reports its median round.
    let (mut as_admin, mut as_bound) = (Vec::new(), Vec::new());
    for round in 0..AUTHZ_ROUNDS {
        as_admin.push(phase(admin.clone(), "bench-admin", round).await);
        as_bound.push(phase(bound.clone(), ns, round).await);
    }
    // The ratio of each pair of neighbouring rounds, whose conditions are the closest
    // (this machine's speed drifts by a third between runs), then their median.
    let ratios = [0, 1].map(|which| {
        let mut r: Vec<f64> = as_admin.iter().zip(&as_bound).map(|(a, b)| b[which].rate() / a[which].rate()).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    });
    (median(as_admin), median(as_bound), ratios)
}

/// `authorization`'s rounds, printed with their ratios.
async fn authorization_report(server: &BenchServer, m: usize) {
    let (admin, bound, ratios) = authorization(server, m).await;
    println!();
    admin[0].row(&format!("create as admin (median of {AUTHZ_ROUNDS})"));
    bound[0].row("create as bound SA (RBAC)");
    admin[1].row(&format!("get as admin (median of {AUTHZ_ROUNDS})"));
    bound[1].row("get as bound SA (RBAC)");
    println!("median of the rounds' ratios, bound service account (RBAC) vs admin:");
    println!("create throughput: {:.2}x", ratios[0]);
    println!("get throughput:    {:.2}x", ratios[1]);
}

/// The round whose create rate is the median, and likewise for gets.
fn median(mut rounds: Vec<[Stats; 2]>) -> [Stats; 2] {
    let pick = |rounds: &mut Vec<[Stats; 2]>, which: usize| {
        rounds.sort_by(|a, b| a[which].rate().total_cmp(&b[which].rate()));
        let middle = &rounds[rounds.len() / 2][which];
        Stats { latencies: middle.latencies.clone(), elapsed: middle.elapsed }
    };
    let create = pick(&mut rounds, 0);
    let get = pick(&mut rounds, 1);
    [create, get]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The same bytes, inserted straight into SQLite with the server's settings (WAL,
/// synchronous=FULL, one transaction per write), one writer at a time.
fn raw_sqlite(dir: &Path, payloads: &[Vec<u8>]) -> Stats {
    let conn = rusqlite::Connection::open(dir.join("raw.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch("CREATE TABLE kv (rev INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, value BLOB)").unwrap();
    let start = Instant::now();
    let mut latencies = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let t = Instant::now();
        conn.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2)",
            rusqlite::params![format!("/registry/core/configmaps/default/bench-{i:06}"), p],
        )
        .unwrap();
        latencies.push(t.elapsed());
    }
    Stats { latencies, elapsed: start.elapsed() }
}

/// The store layer alone (group commit, same concurrency as the API run).
async fn store_only(dir: &Path, payloads: Arc<Vec<Vec<u8>>>) -> Stats {
    use krate_store::Store;
    let store = Arc::new(krate_store::sqlite::SqliteStore::open(dir.join("store.db")).unwrap());
    let n = payloads.len();
    run(0..n, move |i| {
        let (store, payloads) = (store.clone(), payloads.clone());
        async move {
            store
                .create(
                    &format!("/registry/core/configmaps/default/bench-{i:06}"),
                    bytes::Bytes::from(payloads[i].clone()),
                )
                .await
                .unwrap();
        }
    })
    .await
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KRATE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let server = BenchServer::start(&["--disable-agent"]).await;
    let client = server.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pid = server.pid();
    println!(
        "krate API benchmark: N = {n} ConfigMaps (~300 B each), {CONCURRENCY} concurrent clients, {} cores",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );
    println!("idle server RSS: {:.1} MiB", rss_mib(pid));
    if std::env::var("KRATE_BENCH_AUTHZ_ONLY").is_ok() {
        authorization_report(&server, 2000.min(n)).await;
        return;
    }

    let start_rv = cms.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
    let api = cms.clone();
    let create = run(0..n, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &configmap(i)).await.unwrap();
        }
    })
    .await;
    let api = cms.clone();
    let get = run(0..n, move |i| {
        let api = api.clone();
        async move {
            api.get(&format!("bench-{i:06}")).await.unwrap();
        }
    })
    .await;
    let api = cms.clone();
    let lists = 20;
    let list = run(0..lists, move |_| {
        let api = api.clone();
        async move {
            assert!(api.list(&ListParams::default()).await.unwrap().items.len() >= n);
        }
    })
    .await;
    let api = cms.clone();
    let selector_list = run(0..lists, move |_| {
        let api = api.clone();
        async move {
            api.list(&ListParams::default().labels("shard=3")).await.unwrap();
        }
    })
    .await;

    // Watch replay: every create since start_rv, served from the watch cache.
    let t = Instant::now();
    let replayed = cms
        .watch(&WatchParams::default().timeout(30), &start_rv)
        .await
        .unwrap()
        .try_take_while(|e| futures::future::ready(Ok(!matches!(e, WatchEvent::Bookmark(_)))))
        .take(n)
        .try_fold(0usize, |c, event| async move {
            match event {
                WatchEvent::Added(_) => Ok(c + 1),
                // A 410 Gone (start_rv compacted or out of the window) is no result.
                WatchEvent::Error(e) => panic!("the watch replay got an error instead of events: {e:?}"),
                _ => Ok(c),
            }
        })
        .await
        .unwrap();
    let replay_elapsed = t.elapsed();
    assert_eq!(replayed, n, "the watch replay must deliver every create since {start_rv}");

    let rss_created = rss_mib(pid);
    let api = cms.clone();
    let merge_patch = run(0..n, move |i| {
        let api = api.clone();
        async move {
            let patch = Patch::Merge(json!({"metadata": {"labels": {"patched": "merge"}}}));
            api.patch(&format!("bench-{i:06}"), &PatchParams::default(), &patch).await.unwrap();
        }
    })
    .await;
    let api = cms.clone();
    let strategic_patch = run(0..n, move |i| {
        let api = api.clone();
        async move {
            let patch =
                Patch::Strategic(json!({"metadata": {"labels": {"patched": "strategic"}}, "data": {"extra": "x"}}));
            api.patch(&format!("bench-{i:06}"), &PatchParams::default(), &patch).await.unwrap();
        }
    })
    .await;
    let api = cms.clone();
    let apply = run(0..n, move |i| {
        let api = api.clone();
        async move {
            let name = format!("bench-{i:06}");
            let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"applied": "yes"}}, "data": {"owned": "by-bench"}});
            api.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(config)).await.unwrap();
        }
    })
    .await;
    // One client at a time, for a latency comparison with the one-writer raw insert.
    let api = cms.clone();
    let sequential = run_with(1, n * 20..n * 20 + 1000.min(n), move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &configmap(i)).await.unwrap();
        }
    })
    .await;
    // Live watch latency: time from sending a patch to seeing its event.
    let rv = cms.list(&ListParams::default().limit(1)).await.unwrap().metadata.resource_version.unwrap();
    let mut stream = cms.watch(&WatchParams::default().timeout(120), &rv).await.unwrap().boxed();
    let live = 1000.min(n);
    let mut live_lat = Vec::new();
    let live_start = Instant::now();
    for i in 0..live {
        let t = Instant::now();
        cms.patch(
            &format!("bench-{i:06}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"key": format!("v{i}")}})),
        )
        .await
        .unwrap();
        loop {
            match stream.try_next().await.unwrap() {
                Some(WatchEvent::Modified(cm)) if cm.metadata.name.as_deref() == Some(&format!("bench-{i:06}")) => {
                    break
                }
                Some(_) => continue,
                None => panic!("watch ended early"),
            }
        }
        live_lat.push(t.elapsed());
    }
    let live_stats = Stats { latencies: live_lat, elapsed: live_start.elapsed() };
    let rss_n = rss_mib(pid);

    let payloads: Vec<Vec<u8>> = (0..n).map(|i| serde_json::to_vec(&configmap(i)).unwrap()).collect();
    let raw = raw_sqlite(dir.path(), &payloads);
    let store = store_only(dir.path(), Arc::new(payloads)).await;

    println!();
    create.row("API create");
    sequential.row("API create (1 client)");
    get.row("API get");
    merge_patch.row("API merge patch");
    strategic_patch.row("API strategic merge patch");
    apply.row("API server-side apply");
    list.row(&format!("API list (all {n})"));
    selector_list.row("API list (labelSelector)");
    println!(
        "{:<28} {:>8} ev  {:>10.0} ev/s",
        "API watch replay",
        replayed,
        replayed as f64 / replay_elapsed.as_secs_f64()
    );
    live_stats.row("API patch→watch event");
    raw.row("raw SQLite insert (1 writer)");
    store.row("store create (32 writers)");
    println!();
    println!("create throughput, API vs raw SQLite insert: {:.2}x", create.rate() / raw.rate());
    println!(
        "create p50 latency, API (1 client) vs raw SQLite insert: {:.2}x",
        sequential.percentile(0.5).as_secs_f64() / raw.percentile(0.5).as_secs_f64()
    );
    println!("create throughput, API vs store layer:       {:.2}x", create.rate() / store.rate());
    println!("objects listed per second: {:.0}", list.rate() * n as f64);
    println!("server-side apply vs merge patch throughput: {:.2}x", apply.rate() / merge_patch.rate());
    println!(
        "server RSS with {n} ConfigMaps: {rss_created:.1} MiB after create; {rss_n:.1} MiB after patches and apply"
    );

    authorization_report(&server, 2000.min(n)).await;

    if std::env::var("KRATE_BENCH_SKIP_100K").is_err() {
        let api = cms.clone();
        let more = run(n..n * 10, move |i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &configmap(i)).await.unwrap();
            }
        })
        .await;
        more.row(&format!("API create (to {})", n * 10));
        println!("server RSS with {} ConfigMaps: {:.1} MiB", n * 10, rss_mib(pid));
    }
    drop(server);
}
