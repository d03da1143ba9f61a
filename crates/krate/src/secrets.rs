//! `krate secrets-encrypt`: the key that encrypts Secrets at rest, shown and rotated on
//! the server's machine. Rotation writes the server's EncryptionConfiguration with a new
//! key first (the previous one kept so that values not yet rewritten stay readable);
//! the running server picks the file up, rewrites every stored value under the new key
//! and reports it in `<config>.status`, which this command waits for.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use krate_apiserver::encryption::{self, EncryptedStore};

#[derive(Args, Debug)]
pub struct SecretsEncryptArgs {
    #[command(subcommand)]
    pub action: Action,
    /// The server's data directory (its configuration is pki/encryption-config.yaml).
    #[arg(long, global = true, default_value = crate::server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The configuration file, when the server was started with
    /// --encryption-provider-config.
    #[arg(long, global = true)]
    pub encryption_provider_config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Which key writes Secrets, and whether every stored value is under it.
    Status,
    /// Put a new key first, wait until the running server has rewritten every Secret
    /// under it, and drop keys older than the previous one.
    Rotate {
        /// Seconds to wait for the server.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
    },
}

pub fn run(args: SecretsEncryptArgs) -> Result<()> {
    let path =
        args.encryption_provider_config.clone().unwrap_or_else(|| args.data_dir.join("pki/encryption-config.yaml"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is this the server's --data-dir?)", path.display()))?;
    let config = encryption::Config::parse(&text).with_context(|| path.display().to_string())?;
    let status_path = EncryptedStore::status_path(&path);
    let status = || -> Option<serde_json::Value> { serde_json::from_slice(&std::fs::read(&status_path).ok()?).ok() };
    match args.action {
        Action::Status => {
            let writer = config.writer("/registry/core/secrets/").unwrap_or_else(|| "identity".into());
            println!("configuration:  {}", path.display());
            println!("writing key:    {writer}");
            match status() {
                Some(s) if s["configSha256"].as_str() == Some(encryption::fingerprint(&text).as_str()) => {
                    println!(
                        "stored values:  all under {} (the server's last pass rewrote {})",
                        s["writer"].as_str().unwrap_or("?"),
                        s["rewritten"]
                    )
                }
                _ => println!("stored values:  the running server has not finished with this configuration yet"),
            }
            Ok(())
        }
        Action::Rotate { timeout_seconds } => {
            let timeout = Duration::from_secs(timeout_seconds);
            let rotated = encryption::rotated_config(&text).with_context(|| path.display().to_string())?;
            let new_writer = encryption::Config::parse(&rotated)?.writer("/registry/core/secrets/").unwrap_or_default();
            crate::pki::write_private(&path, &rotated)?;
            println!("wrote {} with the new key {new_writer} first", path.display());
            println!("waiting for the server to rewrite stored Secrets under it ...");
            let deadline = Instant::now() + timeout;
            let wanted = encryption::fingerprint(&rotated);
            loop {
                if let Some(s) = status().filter(|s| s["configSha256"].as_str() == Some(wanted.as_str())) {
                    println!("done: {} values rewritten; every Secret is now under {new_writer}", s["rewritten"]);
                    return Ok(());
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "the server did not report the new key within {timeout:?}: is `krate server` running with this data directory? It rewrites Secrets once it runs (see its log)"
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
