//! `krate backup` and `krate restore`: a cluster's state in one file, taken while the
//! server runs, and a new data directory made from it.
//!
//! A backup is a gzipped tar: `krate-backup.json` (what it holds: krate version, store
//! format, revision, object count, whether keys are in it), `db/state.db` (a consistent
//! copy of the SQLite store from its online backup API) or, for a server on etcd,
//! `db/etcd.snapshot` (etcd's own snapshot, streamed from a member) and, unless `--no-keys`, the
//! cluster's certificates and keys (`pki/`, the CA, service-account signing and
//! encryption-at-rest keys) and `admin.kubeconfig`. The node agent's directory is not
//! cluster state and stays out.
//!
//! A restore never overwrites: it writes a new data directory (staged beside it and
//! renamed into place), with the store's revision moved past anything the old cluster
//! can have handed out: SQLite's at once (`krate_store::sqlite::prepare_restored`); an
//! etcd snapshot becomes a one-member cluster's data (etcd's own `etcdctl snapshot
//! restore`) whose revision offset the member's first start moves on
//! (`crate::etcd::finish_restore`), since etcd 3.4 cannot bump a snapshot's revision.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

const MANIFEST: &str = "krate-backup.json";
const DB: &str = "db/state.db";
const ETCD_SNAPSHOT: &str = "db/etcd.snapshot";

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The file to write (a .tar.gz); it is written beside and renamed into place, so
    /// the name never holds half a backup.
    pub file: PathBuf,
    /// The server's data directory. The server may be running.
    #[arg(long, default_value = crate::server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Leave the certificates and keys out (for a backup stored where keys must not
    /// be). Restoring it then needs the old data directory's pki/ copied in by hand, or
    /// Secrets encrypted at rest cannot be read.
    #[arg(long)]
    pub no_keys: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A file `krate backup` wrote.
    pub file: PathBuf,
    /// The new data directory: must not exist or be empty.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// How far the restored store's revision moves past the backup's, so that
    /// resourceVersions never go backwards for clients of the old cluster (upstream's
    /// etcd restore procedure uses the same default).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub bump_revision: i64,
    /// For a backup taken on etcd: the address the restored server will advertise (its
    /// --advertise-address), which names the restored etcd member and its peer URL.
    /// Default: the server's, this machine's primary address.
    #[arg(long)]
    pub advertise_address: Option<std::net::IpAddr>,
    /// For a backup taken on etcd: the restored server's --etcd-peer-port.
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
}

/// What a backup took from the store: the file to add under its name, and its figures.
struct StoreCopy {
    path: PathBuf,
    name: &'static str,
    keys: i64,
    revision: i64,
    format: Value,
    datastore: &'static str,
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let datastore = crate::etcd::Datastore::load(&args.data_dir)?;
    let db = args.data_dir.join(DB);
    if datastore.is_none() && !db.is_file() {
        bail!("no database at {}; is --data-dir the server's data directory?", db.display());
    }
    let dir = args.file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".krate-backup")
        .tempdir_in(dir)
        .with_context(|| format!("creating a working directory in {} (is it writable?)", dir.display()))?;
    let copy = match &datastore {
        Some(datastore) => etcd_snapshot(datastore, staging.path()).await?,
        None => {
            eprintln!("copying the store at {} (online)", db.display());
            let copy = staging.path().join("state.db");
            let snapshot = krate_store::sqlite::backup(&db, &copy)?;
            StoreCopy {
                path: copy,
                name: DB,
                keys: snapshot.keys as i64,
                revision: snapshot.revision,
                format: json!(snapshot.format),
                datastore: "sqlite",
            }
        }
    };
    eprintln!("  {} objects at revision {}", copy.keys, copy.revision);
    let manifest = json!({
        "kind": "KrateBackup",
        "krateVersion": krate_version::VERSION,
        "created": krate_api::object::now_rfc3339(),
        "datastore": copy.datastore,
        "storeFormat": copy.format,
        "revision": copy.revision,
        "objects": copy.keys,
        "includesKeys": !args.no_keys,
    });
    let partial = staging.path().join("backup.tar.gz");
    let mut tar =
        tar::Builder::new(flate2::write::GzEncoder::new(File::create(&partial)?, flate2::Compression::default()));
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;
    append_bytes(&mut tar, MANIFEST, &manifest_bytes, 0o644)?;
    tar.append_path_with_name(&copy.path, copy.name)?;
    if args.no_keys {
        eprintln!(
            "WARNING: the backup holds no certificates or keys (--no-keys). Restoring it needs {}/pki copied into the new data directory, or Secrets encrypted at rest cannot be read and nodes must join again.",
            args.data_dir.display()
        );
    } else {
        let pki = args.data_dir.join("pki");
        if pki.is_dir() {
            tar.append_dir_all("pki", &pki).with_context(|| format!("adding {}", pki.display()))?;
            eprintln!("  added the certificates and keys in {}", pki.display());
        }
        let kubeconfig = args.data_dir.join("admin.kubeconfig");
        if kubeconfig.is_file() {
            tar.append_path_with_name(&kubeconfig, "admin.kubeconfig")?;
        }
    }
    let file = tar.into_inner()?.finish()?;
    file.sync_all()?;
    std::fs::rename(&partial, &args.file).with_context(|| format!("writing {}", args.file.display()))?;
    let size = std::fs::metadata(&args.file)?.len();
    println!(
        "wrote {} ({:.1} MB): {} objects at revision {}{}",
        args.file.display(),
        size as f64 / 1e6,
        copy.keys,
        copy.revision,
        if args.no_keys { ", without keys" } else { "" }
    );
    Ok(())
}

/// An etcd snapshot (etcd's own format, as `etcdctl snapshot save` writes) streamed from
/// the member the client reaches.
async fn etcd_snapshot(datastore: &crate::etcd::Datastore, dir: &Path) -> anyhow::Result<StoreCopy> {
    let store = datastore.connect().await?;
    eprintln!("taking an etcd snapshot from {} (online)", datastore.endpoints.join(","));
    let status = store.status().await?;
    let path = dir.join("etcd.snapshot");
    let mut file = File::create(&path)?;
    let size = store.snapshot(&mut file).await?;
    file.sync_all()?;
    eprintln!("  {:.1} MB from etcd {}", size as f64 / 1e6, status.version);
    Ok(StoreCopy {
        path,
        name: ETCD_SNAPSHOT,
        keys: status.objects,
        revision: status.revision,
        format: json!(format!("etcd {}", status.version)),
        datastore: "etcd",
    })
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)?;
    Ok(())
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let target = &args.data_dir;
    if target.exists() && std::fs::read_dir(target).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!(
            "refusing to restore into {}: it is not empty (a restore never overwrites a cluster); pick a new --data-dir",
            target.display()
        );
    }
    let parent = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new().prefix(".krate-restore").tempdir_in(parent)?;
    let manifest = unpack(&args.file, staging.path())
        .with_context(|| format!("{} is not a readable krate backup", args.file.display()))?;
    let keys = manifest["includesKeys"].as_bool().unwrap_or(false);
    let (count, revision) = if manifest["datastore"] == "etcd" {
        restore_etcd(staging.path(), &manifest, &args)?
    } else {
        restore_sqlite(staging.path(), &manifest, &args)?
    };
    if target.exists() {
        std::fs::remove_dir(target).with_context(|| format!("replacing the empty {}", target.display()))?;
    }
    std::fs::rename(staging.keep(), target).with_context(|| format!("moving the restore into {}", target.display()))?;
    println!(
        "restored {count} objects (revision {} at the backup, {}) into {}; resourceVersions go on from {revision}",
        manifest["revision"],
        manifest["created"].as_str().unwrap_or("unknown time"),
        target.display(),
    );
    if !keys {
        eprintln!(
            "WARNING: the backup holds no certificates or keys: copy the old data directory's pki/ into {}/pki before starting, or a new CA is made, nodes must join again and Secrets encrypted at rest cannot be read.",
            target.display()
        );
    }
    println!("start it with: krate server --data-dir {}", target.display());
    if manifest["datastore"] == "etcd" {
        let advertise = args.advertise_address.unwrap_or_else(crate::server::default_advertise_address);
        println!(
            "  (it runs the restored etcd member as a cluster of one: give it --advertise-address {advertise} \
             --etcd-peer-port {}; other servers join it anew)",
            args.etcd_peer_port
        );
    }
    Ok(())
}

/// The SQLite database of a backup, with its revision bumped: its object count and the
/// revision new writes go on from.
fn restore_sqlite(staging: &Path, manifest: &Value, args: &RestoreArgs) -> anyhow::Result<(i64, i64)> {
    let format = manifest["storeFormat"].as_i64().unwrap_or(0);
    if format > krate_store::sqlite::FORMAT {
        bail!(
            "{} was taken by a newer krate ({}, store format {format}); restore it with that version or newer",
            args.file.display(),
            manifest["krateVersion"].as_str().unwrap_or("unknown")
        );
    }
    let db = staging.join(DB);
    if !db.is_file() {
        bail!("{} holds no {DB}: not a krate backup", args.file.display());
    }
    let restored = krate_store::sqlite::prepare_restored(&db, args.bump_revision)?;
    Ok((restored.keys, restored.revision))
}

/// The etcd snapshot of a backup made the data of a one-member etcd cluster
/// (`etcdctl snapshot restore`: fresh membership, the snapshot's keys and revisions), the
/// bump left to the member's first start: its object count and the revision new writes
/// go on from.
fn restore_etcd(staging: &Path, manifest: &Value, args: &RestoreArgs) -> anyhow::Result<(i64, i64)> {
    let snapshot = staging.join(ETCD_SNAPSHOT);
    if !snapshot.is_file() {
        bail!("{} holds no {ETCD_SNAPSHOT}: not a krate backup", args.file.display());
    }
    let advertise = args.advertise_address.unwrap_or_else(crate::server::default_advertise_address);
    let (name, peer_url) = crate::etcd::member_identity(advertise, args.etcd_peer_port);
    let member_dir = staging.join("db/etcd");
    eprintln!("restoring the etcd snapshot as member {name} ({peer_url})");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("snapshot")
        .arg("restore")
        .arg(&snapshot)
        .args(["--name", &name, "--initial-advertise-peer-urls", &peer_url])
        .arg(format!("--initial-cluster={name}={peer_url}"))
        .arg(format!("--initial-cluster-token=krate-restored-{:08x}", rand::random::<u32>()))
        .arg("--data-dir")
        .arg(&member_dir)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("running etcdctl: {e} (install it: apt-get install etcd-client, or scripts/install-deps)")
        })?;
    if !out.status.success() {
        bail!("etcdctl snapshot restore failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::remove_file(&snapshot)?;
    crate::etcd::restore_pending(staging, args.bump_revision)?;
    let revision = manifest["revision"].as_i64().unwrap_or(0) + args.bump_revision;
    Ok((manifest["objects"].as_i64().unwrap_or(0), revision))
}

/// Unpacks a backup into `dir` (entries only below it) and returns its manifest.
fn unpack(file: &Path, dir: &Path) -> anyhow::Result<Value> {
    let reader = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut manifest = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path == Path::new(MANIFEST) {
            let mut text = String::new();
            entry.read_to_string(&mut text)?;
            let value: Value = serde_json::from_str(&text).context("its manifest is not JSON")?;
            if value["kind"] != "KrateBackup" {
                bail!("its manifest is not a KrateBackup");
            }
            manifest = Some(value);
        } else if !entry.unpack_in(dir)? {
            bail!("it holds an entry outside its own directory: {}", path.display());
        }
    }
    manifest.ok_or_else(|| anyhow::anyhow!("it has no {MANIFEST}"))
}
