//! `krate`: a Kubernetes-compatible container orchestrator in one binary.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod accounts;
mod agent;
mod backup;
mod components;
mod config;
mod dev;
mod doctor;
mod etcd;
mod hollow;
mod install;
mod join;
mod kubeconfig;
mod leader;
mod loadbalancer;
mod migrate;
mod pki;
mod secrets;
mod server;
mod serverjoin;
mod soak;
mod token;

#[derive(Parser)]
#[command(
    name = "krate",
    version = krate_version::VERSION,
    about = "A Kubernetes-compatible container orchestrator in one binary",
    long_about = "krate runs a Kubernetes-compatible control plane that stock kubectl and client \
libraries talk to.\n\nStart a single-node cluster:\n    krate server\nthen point kubectl at the \
kubeconfig it prints:\n    export KUBECONFIG=/var/lib/krate/admin.kubeconfig\n    kubectl get namespaces"
)]
struct Cli {
    /// Log format: human-readable `text` or structured `json`.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the API server (and, as they arrive, the rest of the control plane).
    Server(server::ServerArgs),
    /// Run the controllers (replication, deployments, jobs, garbage collection, node
    /// lifecycle, ...) against any Kubernetes API server, under leader election.
    /// `krate server` already runs them; use this for extra standby copies or other clusters.
    ControllerManager(components::ControllerManagerArgs),
    /// Run the scheduler against any Kubernetes API server, under leader election.
    /// `krate server` already runs one for `default-scheduler`; run more with
    /// `--scheduler-name` for pods that ask for another scheduler.
    Scheduler(components::SchedulerArgs),
    /// Run the node agent: join a cluster as a node and run the pods bound to it as
    /// containers (containerd + runc, started and supervised by krate). `krate server`
    /// already runs one for its own machine.
    Agent(agent::AgentArgs),
    /// Create, list and delete bootstrap tokens, with which new nodes join
    /// (`krate agent --server URL --token TOKEN --ca-cert-hash HASH`).
    Token(token::TokenArgs),
    /// Show or rotate the key that encrypts Secrets at rest (run on the server's machine).
    SecretsEncrypt(secrets::SecretsEncryptArgs),
    /// Remove what krate set up on this machine under a data directory: the node agent's
    /// containers and sandboxes, its containerd, pod bridge and nftables table. The
    /// server or agent using it must be stopped first.
    Reset {
        /// The server's data directory (or an agent's `--dir` parent).
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: std::path::PathBuf,
    },
    /// Shut this node down gracefully, before it powers off: its agent reports the node
    /// not ready, refuses new pods and stops the ones it runs (regular pods first, then
    /// critical ones, within the agent's --shutdown-grace-period), reporting each Failed
    /// with reason Terminated so that their controllers replace them elsewhere. Run it
    /// from a systemd unit ordered before shutdown.target (see the README); stopping or
    /// restarting the agent alone stops no pod.
    ShutdownNode {
        /// The server's data directory (or an agent's `--dir` parent).
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: std::path::PathBuf,
    },
    /// Serve a local image registry (Debian's docker-registry) without authentication,
    /// storing its images under the data directory: what `krate test-images` pushes to
    /// and nodes pull from with --insecure-registry. Runs until stopped.
    Registry {
        /// Where it listens (keep it on loopback: it asks no one for credentials).
        #[arg(long, default_value = "127.0.0.1:5000")]
        address: String,
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: std::path::PathBuf,
    },
    /// Build krate's test images (busybox, test-server) and push them to a registry
    /// reached over plain HTTP, e.g. a local docker-registry at 127.0.0.1:5000, or write
    /// them as image archives for nodes' --airgap-images.
    TestImages {
        #[arg(long, default_value = "127.0.0.1:5000")]
        registry: String,
        /// Write `busybox.tar` and `test-server.tar` (images `krate.local/busybox:1` and
        /// `krate.local/test-server:1`) here instead of pushing.
        #[arg(long)]
        archive_dir: Option<std::path::PathBuf>,
    },
    /// Simulate nodes (like kwok/kubemark): register Nodes, renew their Leases and report
    /// the pods bound to them as Running (or Succeeded/Failed when annotated
    /// `hollow.krate.io/exit-code`, never ready with `hollow.krate.io/not-ready`), without
    /// running anything. For testing and scale runs.
    HollowNodes(hollow::HollowArgs),
    /// Print the admin kubeconfig of a data directory, or (with --user or --node) a new
    /// one for another user, signed by the cluster CA: give each machine and tool only
    /// the identity it needs (a node's agent: `--node NAME`, then RBAC and the node
    /// authorizer decide what it may do).
    Kubeconfig {
        /// The server's data directory.
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: std::path::PathBuf,
        /// A kubeconfig for this user name (e.g. `jane`, `system:kube-scheduler`).
        #[arg(long, conflicts_with = "node")]
        user: Option<String>,
        /// Groups of that user (repeatable).
        #[arg(long = "group", requires = "user")]
        groups: Vec<String>,
        /// A kubeconfig for the node agent of node NAME (`system:node:NAME` in
        /// `system:nodes`).
        #[arg(long)]
        node: Option<String>,
        /// Add it to your own kubeconfig (the first file of $KUBECONFIG, else
        /// ~/.kube/config) as a new context named after the server, `krate-HOST`,
        /// instead of printing it. Other clusters' entries are never changed; merging
        /// the same cluster again refreshes its own.
        #[arg(long)]
        merge: bool,
    },
    /// Check that this cluster is healthy, or find out why not: the API server, the
    /// certificates and when they expire, the store (size, fsync latency), every node
    /// Ready or why not, what this machine needs to run pods, and a live probe (a pod
    /// on every node reaching the others' pods, a Service VIP and cluster DNS, and the
    /// nodes' clocks). A ✓/!/✗ line per check with what to do about each failure; exit
    /// code 1 if any failed.
    Doctor(doctor::DoctorArgs),
    /// Soak the cluster: pin --pods-per-node pods to every Ready node and reach each
    /// through the API server's pod proxy, round after round, printing a progress line
    /// every --interval (requests, errors, latency, the API server's and agents' memory
    /// and open files); exit 1 on any error or on memory growth past
    /// --max-memory-growth. Runs until --duration is over, or for days until Ctrl-C.
    Soak(soak::SoakArgs),
    /// Write the cluster's state to FILE while the server runs: every object (a
    /// consistent copy of the store), and the certificates and keys unless --no-keys.
    Backup(backup::BackupArgs),
    /// Make a new data directory from a backup (never overwriting one); a server
    /// started on it has every object of the backup, and resourceVersions that go on
    /// past any the old cluster handed out.
    Restore(backup::RestoreArgs),
    /// Change where the cluster's state is kept: `krate datastore migrate --to etcd`
    /// moves a stopped single server from SQLite onto an etcd member it runs, so that
    /// other servers can join it.
    #[command(subcommand)]
    Datastore(migrate::DatastoreCommand),
    /// Tools for trying krate and for its tests: `krate dev cluster up --nodes 3` runs a
    /// multi-node cluster on this machine, each node in its own network namespace.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Set this machine up to run krate as a systemd service, as k3s's installer does:
    /// this binary copied to /usr/local/bin/krate, a unit running `krate server` (or
    /// `krate agent`) with the flags after `--`, restarted when it exits and stopping
    /// only krate itself (containers keep running across restarts and upgrades), the
    /// graceful-shutdown unit, then enabled and started. `--root DIR` only writes the
    /// files under DIR.
    Install(install::InstallArgs),
    /// Print where this build came from: krate's version (`git describe` of its
    /// source tree), commit, tree state and build date, and the Kubernetes API version
    /// it serves.
    Version {
        /// `json`: the same object as the API server's /version.
        #[arg(long, short = 'o', value_parser = ["json"])]
        output: Option<String>,
    },
}

/// Runs docker-registry with a configuration of krate's: no authentication (Debian's
/// default one asks for htpasswd credentials), images under `<data_dir>/registry`.
fn serve_registry(address: &str, data_dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = data_dir.join("registry");
    std::fs::create_dir_all(dir.join("data")).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("config.yml");
    let yaml = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}\n",
        dir.join("data").display()
    );
    std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
    println!("registry at {address} (images in {}); push with: krate test-images --registry {address}", dir.display());
    // The registry takes this process's place, so that stopping `krate registry` (by its
    // PID, as scripts do) stops the registry too rather than orphaning it.
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("docker-registry").arg("serve").arg(&config).exec();
    Err(anyhow::Error::new(err).context("running docker-registry (apt-get install -y docker-registry)"))
}

/// Logs to stderr, filtered by `KRATE_LOG` or `default`.
fn init_logging(format: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KRATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn block_on(task: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(task)
}

/// `krate version`.
fn print_version(output: Option<&str>) -> anyhow::Result<()> {
    let info = krate_apiserver::version_info();
    if output == Some("json") {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let build = krate_apiserver::build_info();
    let or_unknown = |s: &'static str| if s.is_empty() { "unknown (not built from git)" } else { s };
    println!("krate {}", build.version);
    println!("  commit:     {}", or_unknown(build.commit));
    println!("  tree:       {}", or_unknown(build.tree_state));
    println!("  built:      {}", build.build_date);
    println!(
        "  serves:     Kubernetes {} API (/version gitVersion {})",
        krate_apiserver::KUBERNETES_VERSION,
        info["gitVersion"].as_str().unwrap_or_default()
    );
    println!("  platform:   {}", info["platform"].as_str().unwrap_or_default());
    Ok(())
}

fn main() -> std::process::ExitCode {
    krate_apiserver::set_build_info(krate_apiserver::BuildInfo {
        version: krate_version::VERSION,
        commit: krate_version::COMMIT,
        tree_state: krate_version::TREE_STATE,
        build_date: krate_version::BUILD_DATE,
    });
    let mut command = Cli::command();
    let (args, origins) = match config::expand(std::env::args_os().collect(), &command) {
        Ok(expanded) => expanded,
        Err(err) => {
            eprintln!("error: {err:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let parsed = command.try_get_matches_from_mut(args).and_then(|m| Cli::from_arg_matches(&m).map(|cli| (m, cli)));
    let (matches, cli) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            let _ = err.print();
            let files: std::collections::BTreeSet<_> = origins.values().map(|f| f.display().to_string()).collect();
            if err.use_stderr() && !files.is_empty() {
                eprintln!("note: flags were also read from {}", files.into_iter().collect::<Vec<_>>().join(", "));
            }
            return std::process::ExitCode::from(err.exit_code() as u8);
        }
    };
    let print_config = match &cli.command {
        Command::Server(args) => args.config.print_config,
        Command::Agent(args) => args.config.print_config,
        _ => false,
    };
    if let (true, Some((name, sub_matches))) = (print_config, matches.subcommand()) {
        let sub = command.find_subcommand(name).expect("the parsed subcommand");
        print!("{}", config::print(sub, sub_matches, &origins));
        return std::process::ExitCode::SUCCESS;
    }
    // doctor reports what fails in its own words; the client's logs would repeat it.
    let default_log =
        if matches!(cli.command, Command::Doctor(_) | Command::Soak(_)) { "warn,kube_client=off" } else { "info" };
    init_logging(&cli.log_format, default_log);
    let result =
        match cli.command {
            Command::Server(args) => block_on(server::run(args)),
            Command::ControllerManager(args) => block_on(components::run_controller_manager(args)),
            Command::Scheduler(args) => block_on(components::run_scheduler(args)),
            Command::HollowNodes(args) => block_on(hollow::run(args)),
            Command::Agent(args) => block_on(agent::run(args)),
            Command::Reset { data_dir } => block_on(agent::reset(data_dir)),
            Command::SecretsEncrypt(args) => secrets::run(args),
            Command::Token(args) => block_on(token::run(args)),
            Command::ShutdownNode { data_dir } => block_on(async move {
                krate_agent::shutdown::request(&data_dir.join("agent"), &mut std::io::stdout()).await
            }),
            Command::Registry { address, data_dir } => serve_registry(&address, &data_dir),
            Command::TestImages { archive_dir: Some(dir), .. } => krate_agent::testimages::write_archives(&dir)
                .map(|names| println!("wrote {} to {}", names.join(" and "), dir.display())),
            Command::TestImages { registry, archive_dir: None } => krate_agent::testimages::push_all(&registry)
                .map(|()| println!("pushed {registry}/busybox:1 and {registry}/test-server:1 (also :latest)")),
            Command::Kubeconfig { data_dir, user, groups, node, merge } => {
                kubeconfig::run(&data_dir, user, groups, node, merge)
            }
            Command::Dev(command) => block_on(dev::run(command)),
            Command::Doctor(args) => block_on(doctor::run(args)),
            Command::Soak(args) => block_on(soak::run(args)),
            Command::Backup(args) => block_on(backup::backup(args)),
            Command::Restore(args) => backup::restore(args),
            Command::Datastore(command) => block_on(migrate::run(command)),
            Command::Version { output } => print_version(output.as_deref()),
            Command::Install(args) => install::run(args, |line| {
                let argv = std::iter::once("krate".to_string()).chain(line.iter().cloned());
                Cli::try_parse_from(argv).map(|_| ()).map_err(|e| anyhow::anyhow!("the service would not start:\n{e}"))
            }),
        };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
