//! `krate datastore migrate --to etcd`: a single server's SQLite cluster moved onto a
//! managed etcd member in the same data directory, so that other servers can join it.
//!
//! The server must be stopped. Every key is copied as stored (Secrets stay encrypted
//! under the same keys), and the cluster's revisions are offset past the SQLite store's
//! (`krate_store::etcd::REVISION_OFFSET_KEY`): clients of the old store never see a resourceVersion go backwards (their watches
//! relist, as after any restore). The SQLite file is kept beside, renamed
//! `state.db.migrated`, and the data directory then starts as a `--cluster-init` one.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use krate_store::sqlite::SqliteStore;
use krate_store::{ListRequest, Store};

#[derive(Subcommand, Debug)]
pub enum DatastoreCommand {
    /// Move a stopped server's state from SQLite to an etcd member it will run
    /// (`--cluster-init` from then on): every object, resourceVersions never going back.
    Migrate(MigrateArgs),
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Where to: `etcd` (the only one for now).
    #[arg(long, value_parser = ["etcd"])]
    pub to: String,
    /// The server's data directory (the server must be stopped).
    #[arg(long, default_value = crate::server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The address the server advertises (its --advertise-address; the member is named
    /// and reached by it). Default: the server's, this machine's primary address.
    #[arg(long)]
    pub advertise_address: Option<IpAddr>,
    /// Client port of the etcd member (the server's --etcd-client-port).
    #[arg(long, default_value_t = 2379)]
    pub etcd_client_port: u16,
    /// Peer port of the etcd member (the server's --etcd-peer-port).
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
}

pub async fn run(command: DatastoreCommand) -> Result<()> {
    let DatastoreCommand::Migrate(args) = command;
    let _lock = crate::server::lock_stopped(&args.data_dir)?;
    let db = args.data_dir.join("db/state.db");
    if !db.is_file() {
        bail!("no SQLite database at {}: nothing to migrate", db.display());
    }
    if args.data_dir.join("db/etcd/member").exists() {
        bail!("{} already has an etcd member", args.data_dir.display());
    }
    let sqlite = SqliteStore::open(&db).context("opening the database")?;
    let listed = sqlite.list(ListRequest { prefix: "/".into(), ..Default::default() }).await?;
    let revision = listed.revision;
    drop(sqlite);
    eprintln!("{} keys at revision {revision} in {}", listed.items.len(), db.display());

    let pki = crate::pki::Pki::load_or_create(&args.data_dir.join("pki"))?;
    let dir = args.data_dir.join("db/etcd");
    let advertise = args.advertise_address.unwrap_or_else(crate::server::default_advertise_address);
    let member = crate::etcd::member_config(&dir, &pki, advertise, args.etcd_client_port, args.etcd_peer_port)?;
    eprintln!("starting the etcd member {} in {}", member.name, dir.display());
    let supervised = crate::etcd::Supervised::start(member).await?;
    let datastore = supervised.datastore().await;
    // etcd's count starts again near 1: the cluster's revisions are offset past the
    // SQLite store's, so no resourceVersion goes back.
    let offset = datastore.advance_revision_offset(revision).await?;
    let etcd = datastore.connect().await?;
    eprintln!("etcd's revisions are offset by {offset}, past the SQLite store's {revision}");
    let total = listed.items.len();
    for (i, kv) in listed.items.into_iter().enumerate() {
        etcd.create(&kv.key, kv.value).await.with_context(|| format!("copying {}", kv.key))?;
        if (i + 1) % 1000 == 0 {
            eprintln!("  {} of {total} keys copied", i + 1);
        }
    }
    let now = etcd.current_revision().await?;
    etcd.compact(now).await?;
    datastore.save(&args.data_dir)?;
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        if from.exists() {
            std::fs::rename(&from, format!("{}.migrated{suffix}", db.display()))?;
        }
    }
    println!(
        "migrated {total} keys to etcd; resourceVersions go on from {now} (the SQLite store was at {revision}); \
         the old database is {}.migrated",
        db.display()
    );
    println!(
        "start the server as before (it runs the etcd member; add --etcd-client-port/--etcd-peer-port if you gave them here)"
    );
    Ok(())
}
