//! The etcd member a control-plane server runs for itself (`krate server
//! --cluster-init`): its configuration from the data directory and the cluster CA, and a
//! supervisor that restarts it when it exits. The member process dies with the server
//! (parent-death signal), so a crashed server never leaves an etcd behind.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use krate_store::etcd::process::{EtcdProcess, MemberConfig, MemberTls};
use krate_store::etcd::EtcdConfig;
use tokio::sync::Mutex;

/// Where a server's datastore record is kept, under its data directory.
const RECORD: &str = "db/datastore.json";

/// Which etcd a server's data directory uses, recorded at start so that `krate doctor`
/// and `krate backup` reach the same store without the server's flags. No record: the
/// embedded SQLite database.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Datastore {
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Whether the server runs the member itself (--cluster-init).
    #[serde(default)]
    pub managed: bool,
    /// The managed member's name, and the client URLs of the cluster's members when the
    /// server last started (where `krate reset` finds the others to leave them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
}

impl Datastore {
    pub fn load(data_dir: &Path) -> Result<Option<Self>> {
        let path = data_dir.join(RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let path = data_dir.join(RECORD);
        std::fs::create_dir_all(path.parent().expect("the record is in a directory"))?;
        crate::pki::write_public(&path, &serde_json::to_string_pretty(self)?)
    }

    /// Removes the record: the data directory is back on SQLite.
    pub fn forget(data_dir: &Path) -> Result<()> {
        match std::fs::remove_file(data_dir.join(RECORD)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The client configuration, with the TLS files read.
    pub fn config(&self) -> Result<EtcdConfig> {
        let read = |path: &Option<PathBuf>| {
            path.as_ref().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).transpose()
        };
        Ok(EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca_pem: read(&self.ca_file)?,
            client_cert_pem: read(&self.cert_file)?.zip(read(&self.key_file)?),
        })
    }

    /// The client URLs of every member of the cluster.
    pub async fn member_urls(&self) -> Result<Vec<String>> {
        Ok(self.connect().await?.status().await?.client_urls())
    }

    /// How to reach `member` (started with --cluster-init or joined): at its client URL,
    /// with its own certificate, which the cluster CA signed for clients too.
    fn of_member(member: &MemberConfig) -> Self {
        let tls = member.tls.as_ref();
        Datastore {
            endpoints: vec![member.client_url.clone()],
            ca_file: tls.map(|t| t.ca.clone()),
            cert_file: tls.map(|t| t.cert.clone()),
            key_file: tls.map(|t| t.key.clone()),
            managed: true,
            member: Some(member.name.clone()),
            cluster: Vec::new(),
        }
    }

    /// Moves the cluster's revisions `by` further ahead of etcd's own (a restore, a
    /// migration; no server may be connected); returns the new offset.
    pub async fn advance_revision_offset(&self, by: i64) -> Result<i64> {
        let client = krate_store::etcd::connect_client(&self.config()?).await?;
        Ok(krate_store::etcd::advance_revision_offset(&client, by).await?)
    }

    pub async fn connect(&self) -> Result<krate_store::etcd::EtcdStore> {
        let endpoints = self.endpoints.join(",");
        krate_store::etcd::EtcdStore::connect(&self.config()?).await.with_context(|| {
            format!("cannot reach etcd at {endpoints} (is it running? check --datastore-endpoint and its TLS files)")
        })
    }
}

/// How long a member may take to answer after it starts (a restarted member replays its
/// write-ahead log first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// URL of `ip:port` (IPv6 in brackets).
fn url(ip: IpAddr, port: u16) -> String {
    format!("https://{}", std::net::SocketAddr::new(ip, port))
}

/// The name and peer URL of the member at `advertise`: what etcd records in its
/// membership, so the same on every start (and in a restored snapshot).
pub fn member_identity(advertise: IpAddr, peer_port: u16) -> (String, String) {
    (format!("krate-{}", advertise.to_string().replace(['.', ':'], "-")), url(advertise, peer_port))
}

/// This machine's member: named after its advertise address, serving clients on
/// loopback and that address (advertised), peers on that address, with a fresh
/// certificate from the cluster CA.
pub fn member_config(
    dir: &Path,
    pki: &crate::pki::Pki,
    advertise: IpAddr,
    client_port: u16,
    peer_port: u16,
) -> Result<MemberConfig> {
    let (name, peer_url) = member_identity(advertise, peer_port);
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let sans = vec!["localhost".to_string(), loopback.to_string(), advertise.to_string()];
    let (cert, key) = pki.etcd_member(&name, &sans)?;
    let mut listen = vec![url(loopback, client_port)];
    if advertise != loopback {
        listen.push(url(advertise, client_port));
    }
    Ok(MemberConfig {
        initial_cluster: format!("{name}={peer_url}"),
        name,
        data_dir: dir.to_path_buf(),
        client_url: url(advertise, client_port),
        listen_client_urls: listen,
        peer_url,
        existing: false,
        tls: Some(MemberTls { cert, key, ca: pki.ca_file() }),
    })
}

/// Adds this machine's member (`member`, from [`member_config`]) to the etcd cluster at
/// `endpoints` as a learner, starts it with the cluster's membership, and promotes it to
/// a voting member once it has caught up with the leader (etcd refuses before).
pub async fn join_member(mut member: MemberConfig, endpoints: &[String]) -> Result<Supervised> {
    let cluster = Datastore { endpoints: endpoints.to_vec(), ..Datastore::of_member(&member) }.config()?;
    let mut client = krate_store::etcd::connect_client(&cluster)
        .await
        .with_context(|| format!("reaching the cluster's etcd at {}", endpoints.join(",")))?;
    // A member added by an earlier attempt that never started is replaced.
    for stale in client.member_list().await?.members() {
        if stale.peer_urls().contains(&member.peer_url) {
            eprintln!("removing the member {:x} an earlier join left at {}", stale.id(), member.peer_url);
            client.member_remove(stale.id()).await?;
        }
    }
    // etcd refuses changes of membership until every member has been connected for a
    // while ("unhealthy cluster", right after another member joined).
    let unhealthy = |e: &etcd_client::Error| e.to_string().contains("unhealthy cluster");
    let added = retrying("adding the etcd member", Duration::from_secs(1), unhealthy, || {
        let (mut client, peer_url) = (client.clone(), member.peer_url.clone());
        async move { client.member_add([peer_url], Some(etcd_client::MemberAddOptions::new().with_is_learner())).await }
    })
    .await
    .context("adding the etcd member")?;
    let id = added.member().context("etcd did not say which member it added")?.id();
    let mut peers = Vec::new();
    for m in added.member_list() {
        let name = if m.id() == id { member.name.as_str() } else { m.name() };
        peers.extend(m.peer_urls().iter().map(|url| format!("{name}={url}")));
    }
    member.initial_cluster = peers.join(",");
    member.existing = true;
    eprintln!("added etcd member {} as a learner; starting it", member.name);
    let process = EtcdProcess::start(member, START_TIMEOUT).await?;
    retrying(
        "promoting the etcd learner",
        Duration::from_millis(500),
        |_| true,
        || {
            let mut client = client.clone();
            async move { client.member_promote(id).await }
        },
    )
    .await
    .context("promoting the etcd learner (it did not catch up in time)")?;
    eprintln!("the etcd member caught up and votes");
    Ok(Supervised::adopt(process))
}

/// Runs `op` until it succeeds, fails with an error `passing` does not excuse, or
/// [`START_TIMEOUT`] is over, `pause` apart, saying why it tries again.
async fn retrying<T, F, Fut>(
    what: &str,
    pause: Duration,
    passing: impl Fn(&etcd_client::Error) -> bool,
    mut op: F,
) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        match op().await {
            Err(e) if passing(&e) && std::time::Instant::now() < deadline => {
                eprintln!("{what}: not yet ({e}); trying again");
                tokio::time::sleep(pause).await;
            }
            result => return result,
        }
    }
}

/// A member kept running: restarted (after a pause) whenever it exits.
pub struct Supervised {
    process: Arc<Mutex<EtcdProcess>>,
}

impl Supervised {
    pub async fn start(config: MemberConfig) -> Result<Self> {
        Ok(Self::adopt(EtcdProcess::start(config, START_TIMEOUT).await?))
    }

    /// Supervises a member already started.
    pub fn adopt(process: EtcdProcess) -> Self {
        let process = Arc::new(Mutex::new(process));
        let watched = process.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut member = watched.lock().await;
                let Some(status) = member.exited() else { continue };
                tracing::error!(%status, "the etcd member exited; starting it again");
                let config = member.config.clone();
                match EtcdProcess::start(config, START_TIMEOUT).await {
                    Ok(again) => *member = again,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "restarting the etcd member failed; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
        Self { process }
    }

    /// How the API server reaches the member.
    pub async fn datastore(&self) -> Datastore {
        Datastore::of_member(&self.process.lock().await.config)
    }
}

/// Where `krate restore` leaves what the restored member's first start must finish.
const RESTORE_PENDING: &str = "db/etcd-restore-pending.json";

/// Leaves the last step of restoring an etcd snapshot into `data_dir` to the member's
/// first start: moving the cluster's revisions `bump` past the snapshot's.
pub fn restore_pending(data_dir: &Path, bump: i64) -> Result<()> {
    crate::pki::write_public(&data_dir.join(RESTORE_PENDING), &serde_json::json!({ "bumpRevision": bump }).to_string())
}

/// A restore's last step, on the restored member's first start: the cluster's revisions
/// move past the old cluster's (the revision offset grows by the restore's bump) and the
/// restored history is compacted, so a client of the old cluster relists instead of
/// seeing a resourceVersion again. Done once; a crash before the record goes only bumps
/// further.
pub async fn finish_restore(data_dir: &Path, datastore: &Datastore) -> Result<()> {
    let path = data_dir.join(RESTORE_PENDING);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let pending: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let bump = pending["bumpRevision"].as_i64().unwrap_or(1_000_000_000);
    let offset = datastore.advance_revision_offset(bump).await?;
    let store = datastore.connect().await?;
    let current = krate_store::Store::current_revision(&store).await?;
    krate_store::Store::compact(&store, current).await?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    tracing::info!(offset, revision = current, "restored etcd snapshot: resourceVersions go on past the old cluster's");
    Ok(())
}

/// Takes this data directory's member out of its etcd cluster (the server is stopped):
/// removed from the membership through another member, then its data deleted. Returns
/// what it did, for `krate reset` to report.
pub async fn leave(data_dir: &Path) -> Result<Vec<String>> {
    let Some(datastore) = Datastore::load(data_dir)? else { return Ok(Vec::new()) };
    let (true, Some(name)) = (datastore.managed, datastore.member.clone()) else { return Ok(Vec::new()) };
    let mut done = Vec::new();
    let others: Vec<String> = datastore.cluster.iter().filter(|u| !datastore.endpoints.contains(u)).cloned().collect();
    if !others.is_empty() {
        let config = Datastore { endpoints: others.clone(), ..datastore.clone() }.config()?;
        let mut client = krate_store::etcd::connect_client(&config)
            .await
            .with_context(|| format!("reaching the other etcd members at {} to leave", others.join(",")))?;
        let members = client.member_list().await.context("listing the etcd members")?;
        if let Some(me) = members.members().iter().find(|m| m.name() == name) {
            // etcd refuses or delays changes of membership while the cluster settles (a
            // member just restarted, say).
            let id = me.id();
            retrying(
                "removing this member from etcd",
                Duration::from_secs(2),
                |_| true,
                || {
                    let mut client = client.clone();
                    async move {
                        match client.member_remove(id).await {
                            // An earlier try that timed out on our side went through after all.
                            Err(e) if e.to_string().contains("member not found") => Ok(()),
                            result => result.map(|_| ()),
                        }
                    }
                },
            )
            .await
            .context("removing this member from etcd")?;
            done.push(format!("etcd member {name} (removed from the cluster at {})", others.join(",")));
        }
    }
    let dir = data_dir.join("db/etcd");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        done.push(format!("{} (the member's data)", dir.display()));
    }
    Datastore::forget(data_dir)?;
    Ok(done)
}
