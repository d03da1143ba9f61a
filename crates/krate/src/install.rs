//! `krate install server|agent`: this binary set up as a systemd service, as k3s's
//! installer does: copied to `/usr/local/bin/krate`, a unit that runs `krate server` (or
//! `krate agent`) with the given flags and restarts it, and the unit that shuts the node
//! down gracefully before the machine powers off; then enabled and started.
//!
//! The unit stops only krate's own process (`KillMode=process`): containerd and the
//! containers live in the service's cgroup too, and stopping or upgrading krate must not
//! stop them (fail-static, as upstream's kubelet units and k3s's do). `--root DIR`
//! writes the same files under DIR and runs nothing, for images and for a look first.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Role {
    /// `krate server`: the control plane, and a node unless --disable-agent.
    Server,
    /// `krate agent`: a node joining a cluster (--server, --token, --ca-cert-hash).
    Agent,
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// What this machine runs.
    pub role: Role,
    /// The flags the service runs it with, after `--`: e.g.
    /// `krate install agent -- --server https://10.0.0.1:6443 --token ... --ca-cert-hash sha256:...`.
    /// (Flags can also live in /etc/krate/config.yaml, which both read.)
    #[arg(last = true)]
    pub flags: Vec<String>,
    /// Write the files under this directory instead of `/` and run nothing (no
    /// systemctl): to look at them first, or to build a machine image.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Enable the service but do not start it now.
    #[arg(long)]
    pub no_start: bool,
}

const BIN: &str = "usr/local/bin/krate";
const UNITS: &str = "etc/systemd/system";
const SHUTDOWN_UNIT: &str = "krate-shutdown.service";

impl Role {
    fn unit(self) -> &'static str {
        match self {
            Role::Server => "krate.service",
            Role::Agent => "krate-agent.service",
        }
    }

    fn command(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

/// One argument as systemd's ExecStart reads it: quoted when it has to be.
fn systemd_quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_=:/.,@+".contains(c)) {
        return arg.to_string();
    }
    let escaped = arg.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$");
    format!("\"{escaped}\"")
}

/// The service unit that runs `krate ROLE FLAGS`.
fn service_unit(role: Role, flags: &[String]) -> String {
    let exec: Vec<String> = [format!("/{BIN}"), role.command().to_string()]
        .into_iter()
        .chain(flags.iter().map(|f| systemd_quote(f)))
        .collect();
    let what = match role {
        Role::Server => "krate server: a Kubernetes-compatible control plane (and node)",
        Role::Agent => "krate agent: a node of a krate cluster",
    };
    format!(
        "# Written by `krate install {role}`; run it again to change the flags.
[Unit]
Description={what}
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart={exec}
# Stop krate only: containerd and the containers stay up (fail-static), and the next
# krate adopts them.
KillMode=process
Delegate=yes
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
TimeoutStartSec=0
Restart=always
RestartSec=5s

[Install]
WantedBy=multi-user.target
",
        role = role.command(),
        exec = exec.join(" "),
    )
}

/// The unit that drains the node before the machine powers off (`krate shutdown-node`).
fn shutdown_unit() -> String {
    format!(
        "# Written by `krate install`: graceful node shutdown before the machine powers off.
[Unit]
Description=krate: stop this node's pods gracefully before shutdown
DefaultDependencies=no
Before=shutdown.target

[Service]
Type=oneshot
ExecStart=/{BIN} shutdown-node

[Install]
WantedBy=shutdown.target
"
    )
}

/// Writes `contents` to `path` through a temporary file beside it.
fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().expect("an absolute path");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = path.with_extension("krate-install");
    std::fs::write(&staged, contents).with_context(|| format!("writing {}", staged.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&staged, path).with_context(|| format!("moving {} into place", path.display()))?;
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl (is this a systemd machine? `--root DIR` writes the files only)")?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(args: InstallArgs, check_flags: impl Fn(&[String]) -> Result<()>) -> Result<()> {
    // A flag the service would refuse is refused now, not at every restart.
    let mut line = vec![args.role.command().to_string()];
    line.extend(args.flags.iter().cloned());
    check_flags(&line)?;

    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let binary = std::env::current_exe().context("finding this binary")?;
    let target = root.join(BIN);
    if std::fs::canonicalize(&binary).ok() != std::fs::canonicalize(&target).ok() {
        let bytes = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
        write(&target, &bytes, 0o755)?;
        println!("installed {} as {}", binary.display(), target.display());
    }
    let unit = root.join(UNITS).join(args.role.unit());
    write(&unit, service_unit(args.role, &args.flags).as_bytes(), 0o644)?;
    println!("wrote {}", unit.display());
    let shutdown = root.join(UNITS).join(SHUTDOWN_UNIT);
    write(&shutdown, shutdown_unit().as_bytes(), 0o644)?;
    println!("wrote {}", shutdown.display());

    let name = args.role.unit();
    if args.root.is_some() {
        println!("nothing started (--root); on the machine: systemctl daemon-reload && systemctl enable --now {name} {SHUTDOWN_UNIT}");
        return Ok(());
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", SHUTDOWN_UNIT])?;
    if args.no_start {
        systemctl(&["enable", name])?;
        println!("enabled {name}; start it with: systemctl start {name}");
    } else {
        systemctl(&["enable", "--now", name])?;
        println!("started {name}: journalctl -u {name} -f shows its log; `krate doctor` checks the cluster");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_quoted_as_systemd_reads_them() {
        assert_eq!(systemd_quote("--port"), "--port");
        assert_eq!(systemd_quote("https://10.0.0.1:6443"), "https://10.0.0.1:6443");
        assert_eq!(systemd_quote("a b"), "\"a b\"");
        assert_eq!(systemd_quote("say \"hi\" 100%"), "\"say \\\"hi\\\" 100%%\"");
        assert_eq!(systemd_quote("$HOME"), "\"$$HOME\"");
        assert_eq!(systemd_quote(""), "\"\"");
    }
}
