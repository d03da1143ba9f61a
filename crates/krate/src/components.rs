//! `krate controller-manager` and `krate scheduler`: the control loops as stand-alone
//! API clients of any Kubernetes API server, each under leader election so several
//! copies can run safely. `krate server` runs the same two in-process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::leader::{self, Election};

#[derive(Args, Debug, Clone)]
pub struct ElectionArgs {
    /// Run only while holding the Lease in kube-system, so that several copies can run
    /// (one works, the others stand by). Pass `--leader-elect=false` for a single copy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Seconds a leader's Lease lasts without renewal before a standby takes over.
    #[arg(long, default_value_t = 15)]
    pub leader_elect_lease_duration_seconds: u64,
    /// Name this copy holds the Lease under (default: host name and a random suffix).
    /// A copy restarted under the same identity takes its Lease back at once.
    #[arg(long)]
    pub leader_elect_identity: Option<String>,
}

impl ElectionArgs {
    fn timing(&self) -> leader::Timing {
        let lease = self.leader_elect_lease_duration_seconds.max(2);
        leader::Timing {
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(lease * 2 / 3),
            retry_period: Duration::from_secs((lease * 2 / 15).max(1)),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ControllerManagerArgs {
    /// Kubeconfig of the cluster to manage.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// The CA certificate (PEM) approved CertificateSigningRequests are signed with, as
    /// upstream's flag; with --cluster-signing-key-file. Without them nothing is signed.
    #[arg(long, requires = "cluster_signing_key_file")]
    pub cluster_signing_cert_file: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, requires = "cluster_signing_cert_file")]
    pub cluster_signing_key_file: Option<PathBuf>,
    /// The longest lifetime of the certificates it signs.
    #[arg(long, default_value = "8760h")]
    pub cluster_signing_duration: String,
    /// Assign each Node without one a pod CIDR from this range (as upstream's
    /// --allocate-node-cidrs with --cluster-cidr); default: nodes bring their own.
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// The prefix length of each node's pod CIDR (default 24 for IPv4, 64 for IPv6).
    #[arg(long)]
    pub node_cidr_mask_size: Option<u8>,
    /// Run each controller as its own service account in kube-system (created when
    /// missing), with a token the manager requests for it, as upstream's flag of the
    /// same name: a controller may change only what its role allows. With `false`,
    /// every controller acts as the kubeconfig's user.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub use_service_account_credentials: bool,
    #[command(flatten)]
    pub settings: ControllerSettings,
}

#[derive(Args, Debug, Clone)]
pub struct ControllerSettings {
    /// Seconds a node's Lease may go unrenewed before the node is marked unreachable
    /// (NotReady, tainted) and its pods are evicted after their tolerations.
    #[arg(long, default_value_t = 40)]
    pub node_monitor_grace_period_seconds: u64,
    /// Finished pods kept before the oldest are deleted (pod garbage collection).
    #[arg(long, default_value_t = 12_500)]
    pub terminated_pod_gc_threshold: usize,
    #[command(flatten)]
    pub election: ElectionArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SchedulerArgs {
    /// Kubeconfig of the cluster to schedule for.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    #[command(flatten)]
    pub settings: SchedulerSettings,
}

#[derive(Args, Debug, Clone)]
pub struct SchedulerSettings {
    /// Schedule the pods whose `spec.schedulerName` is this.
    #[arg(long, default_value = krate_scheduler::DEFAULT_SCHEDULER)]
    pub scheduler_name: String,
    #[command(flatten)]
    pub election: ElectionArgs,
}

pub async fn kube_client(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading the kubeconfig {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The cluster CA as PEM, from the kubeconfig (for the `kube-root-ca.crt` ConfigMaps).
pub(crate) fn cluster_ca_pem(kubeconfig: &Path) -> Result<String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cluster = kc.clusters.first().and_then(|c| c.cluster.as_ref()).context("the kubeconfig names no cluster")?;
    if let Some(data) = &cluster.certificate_authority_data {
        use base64::Engine;
        let pem =
            base64::engine::general_purpose::STANDARD.decode(data).context("decoding certificate-authority-data")?;
        return Ok(String::from_utf8(pem)?);
    }
    if let Some(path) = &cluster.certificate_authority {
        return std::fs::read_to_string(path).with_context(|| format!("reading {path}"));
    }
    anyhow::bail!("the kubeconfig has no certificate authority; kube-root-ca.crt ConfigMaps need one")
}

/// Runs `work` directly, or under leader election of Lease `kube-system/<lease>`.
async fn elected<F, Fut>(client: kube::Client, lease: &str, election: &ElectionArgs, work: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    if !election.leader_elect {
        krate_client::supervised(lease, &work).await;
        return Ok(());
    }
    let identity = election.leader_elect_identity.clone().unwrap_or_else(leader::identity);
    Election::new(client, lease, identity, election.timing()).run(work).await
}

pub async fn run_controller_manager(args: ControllerManagerArgs) -> Result<()> {
    let clients = if args.use_service_account_credentials {
        let accounts = crate::accounts::AccountClients::new(&args.kubeconfig).await?;
        krate_controllers::Clients::per_controller(move |account| match account {
            None => accounts.manager(),
            Some(account) => accounts.client(account),
        })
    } else {
        krate_controllers::Clients::single(kube_client(&args.kubeconfig).await?)
    };
    let read = |path: &Path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    let signing = match (&args.cluster_signing_cert_file, &args.cluster_signing_key_file) {
        (Some(cert), Some(key)) => Some(krate_controllers::certificates::SigningCa {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            duration: crate::agent::duration(&args.cluster_signing_duration, "--cluster-signing-duration")?,
        }),
        _ => None,
    };
    let cluster_cidr = args.cluster_cidr.as_deref().map(|c| cluster_cidr(c, args.node_cidr_mask_size)).transpose()?;
    let config = args.settings.config(cluster_ca_pem(&args.kubeconfig)?, signing, true, cluster_cidr);
    controller_manager(clients, config, &args.settings.election).await
}

/// `--cluster-cidr` and `--node-cidr-mask-size`, checked.
pub fn cluster_cidr(cidr: &str, mask: Option<u8>) -> Result<krate_controllers::nodeipam::ClusterCidr> {
    let parsed = cidr.parse().with_context(|| format!("--cluster-cidr {cidr:?}"))?;
    krate_controllers::nodeipam::ClusterCidr::new(parsed, mask).context("--node-cidr-mask-size")
}

impl ControllerSettings {
    /// The controllers' configuration under these settings.
    pub fn config(
        &self,
        root_ca_pem: String,
        signing: Option<krate_controllers::certificates::SigningCa>,
        approve_joins: bool,
        cluster_cidr: Option<krate_controllers::nodeipam::ClusterCidr>,
    ) -> krate_controllers::Config {
        krate_controllers::Config {
            node_monitor_grace_period: Duration::from_secs(self.node_monitor_grace_period_seconds),
            terminated_pod_gc_threshold: self.terminated_pod_gc_threshold,
            root_ca_pem,
            signing,
            approve_joins,
            cluster_cidr,
        }
    }
}

/// The controllers through `clients`, under `election`.
pub async fn controller_manager(
    clients: krate_controllers::Clients,
    config: krate_controllers::Config,
    election: &ElectionArgs,
) -> Result<()> {
    elected(clients.manager(), "kube-controller-manager", election, || {
        krate_controllers::run(clients.clone(), config.clone())
    })
    .await
}

pub async fn run_scheduler(args: SchedulerArgs) -> Result<()> {
    scheduler(kube_client(&args.kubeconfig).await?, &args.settings).await
}

/// The scheduler as `client`, under `settings`' election.
pub async fn scheduler(client: kube::Client, settings: &SchedulerSettings) -> Result<()> {
    // Each scheduler name elects its own leader, as upstream's profiles do.
    let name = &settings.scheduler_name;
    let lease = if name == krate_scheduler::DEFAULT_SCHEDULER { "kube-scheduler".to_string() } else { name.clone() };
    elected(client.clone(), &lease, &settings.election, || krate_scheduler::run(client.clone(), name)).await
}
