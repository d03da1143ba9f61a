//! `krate token create|list|delete`: bootstrap tokens, with which new nodes join
//! (`krate agent --server ... --token ... --ca-cert-hash ...`), as `kubeadm token`. A
//! token is a Secret in kube-system; the controllers sign `cluster-info` with it and
//! delete it when it expires.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use krate_client::bootstrap::{self, Token, TokenSecret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// The group `krate token create` puts tokens in by default: the default policy lets it
/// request node client certificates, approved automatically.
pub const NODE_GROUP: &str = "system:bootstrappers:krate:default-node-token";
/// The description of the token `krate server` keeps for its join command.
pub const SERVER_TOKEN: &str = "the join token krate server prints at start";

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Kubeconfig of the cluster (default: the admin kubeconfig of --data-dir).
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The server's data directory, for its admin kubeconfig.
    #[arg(long, default_value = crate::server::DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (with --print-join-command, the whole `krate agent`
    /// command a new node runs).
    Create {
        /// The token to create (ID.SECRET, [a-z0-9]{6}.[a-z0-9]{16}); default: a random one.
        token: Option<String>,
        /// How long it is valid, e.g. 24h, 30m; 0 for ever.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// What it is for, shown by `krate token list`.
        #[arg(long)]
        description: Option<String>,
        /// What it may be used for: signing (discovery), authentication (joining).
        #[arg(long, value_delimiter = ',', default_value = "signing,authentication")]
        usages: Vec<String>,
        /// Extra groups its user is in when it authenticates (system:bootstrappers:...).
        #[arg(long, value_delimiter = ',', default_value = NODE_GROUP)]
        groups: Vec<String>,
        /// Print the `krate agent` command that joins a node with this token.
        #[arg(long)]
        print_join_command: bool,
    },
    /// List the tokens.
    List,
    /// Delete tokens (by ID or whole token).
    Delete {
        #[arg(required = true)]
        tokens: Vec<String>,
    },
}

/// A new token Secret from these settings, validated.
pub fn new_token(
    token: Option<&str>,
    ttl: Duration,
    description: Option<String>,
    usages: Vec<String>,
    groups: Vec<String>,
) -> Result<TokenSecret> {
    let token = match token {
        Some(t) => t.parse::<Token>().map_err(anyhow::Error::msg)?,
        None => Token::generate(),
    };
    for usage in &usages {
        if !bootstrap::USAGES.contains(&usage.as_str()) {
            anyhow::bail!("unknown usage {usage:?}: a token is for {}", bootstrap::USAGES.join(" and "));
        }
    }
    for group in &groups {
        if !TokenSecret::valid_group(group) {
            anyhow::bail!("extra group {group:?} must start with {}: (e.g. {NODE_GROUP})", bootstrap::GROUP);
        }
    }
    let expiration =
        (!ttl.is_zero()).then(|| jiff::Timestamp::now() + jiff::SignedDuration::from_secs(ttl.as_secs() as i64));
    Ok(TokenSecret { token, description, expiration, usages, extra_groups: groups })
}

pub async fn create(client: &kube::Client, token: &TokenSecret) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), bootstrap::SECRET_NAMESPACE);
    let secret: Secret = serde_json::from_value(token.to_secret())?;
    api.create(&PostParams::default(), &secret).await.map_err(|e| match e {
        kube::Error::Api(e) if e.code == 409 => anyhow::anyhow!("a token with ID {} exists already", token.token.id),
        e => e.into(),
    })?;
    Ok(())
}

pub async fn list(client: &kube::Client) -> Result<Vec<TokenSecret>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), bootstrap::SECRET_NAMESPACE);
    let list = api.list(&ListParams::default().fields(&format!("type={}", bootstrap::SECRET_TYPE))).await?;
    let mut tokens: Vec<TokenSecret> =
        list.items.iter().filter_map(|s| TokenSecret::from_secret(&serde_json::to_value(s).ok()?)).collect();
    tokens.sort_by(|a, b| a.token.id.cmp(&b.token.id));
    Ok(tokens)
}

/// The command a new node joins with.
pub fn join_command(server: &str, token: &Token, ca_pem: &str) -> Result<String> {
    let ca =
        bootstrap::pem_certificates(ca_pem).into_iter().next().context("the cluster CA is not a PEM certificate")?;
    Ok(format!("krate agent --server {server} --token {token} --ca-cert-hash {}", bootstrap::ca_cert_hash(&ca)?))
}

/// The token `krate server` prints a join command with: one it made before that is
/// valid for another hour, or a new one valid for a day.
pub async fn server_token(client: &kube::Client) -> Result<Token> {
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let existing = list(client)
        .await?
        .into_iter()
        .find(|t| t.description.as_deref() == Some(SERVER_TOKEN) && t.expiration.is_some_and(|e| e > soon));
    if let Some(t) = existing {
        return Ok(t.token);
    }
    let token = new_token(
        None,
        Duration::from_secs(24 * 3600),
        Some(SERVER_TOKEN.into()),
        bootstrap::USAGES.iter().map(|u| u.to_string()).collect(),
        vec![NODE_GROUP.into()],
    )?;
    create(client, &token).await?;
    Ok(token.token)
}

/// Waits until `cluster-info` carries the bootstrap signer's signature for `token`.
pub async fn wait_signed(client: &kube::Client, token: &Token, timeout: Duration) -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), bootstrap::CLUSTER_INFO_NAMESPACE);
    let key = format!("{}{}", bootstrap::JWS_PREFIX, token.id);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let info = api.get_opt(bootstrap::CLUSTER_INFO).await?;
        if info.and_then(|i| i.data).is_some_and(|d| d.contains_key(&key)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("cluster-info is not signed for token {:?} after {timeout:?}: is the bootstrap signer (the controllers) running?", token.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The bindings that let anonymous users ask for node client certificates (and have them
/// approved), present exactly while `open` (`--node-registration open`).
pub async fn open_registration(client: &kube::Client, open: bool) -> Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
    for (name, role) in [
        ("system:krate:node-registration-open", "system:node-bootstrapper"),
        (
            "system:krate:node-registration-open-autoapprove",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
        ),
    ] {
        if open {
            let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}],
            }))?;
            match api.create(&PostParams::default(), &binding).await {
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                r => {
                    r?;
                }
            }
        } else {
            match api.delete(name, &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                r => {
                    r?;
                }
            }
        }
    }
    if open {
        tracing::warn!("--node-registration open: anyone who reaches this server may join as a node");
    }
    Ok(())
}

/// `cluster-info` in kube-public: the address and CA bundle joining nodes discover.
pub async fn publish_cluster_info(client: &kube::Client, server: &str, ca_pem: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), bootstrap::CLUSTER_INFO_NAMESPACE);
    let kubeconfig = bootstrap::cluster_info_kubeconfig(server, ca_pem);
    match api.get_opt(bootstrap::CLUSTER_INFO).await? {
        Some(mut info) => {
            let data = info.data.get_or_insert_with(Default::default);
            // Several servers of one cluster each advertise their own address: the first
            // one's stays while the CA is the same (a rewrite would void the tokens'
            // signatures until the signer catches up, failing joins meanwhile).
            let same_ca = data
                .get(bootstrap::KUBECONFIG_KEY)
                .and_then(|k| bootstrap::read_cluster_info_kubeconfig(k).ok())
                .is_some_and(|(_, ca)| ca.trim() == ca_pem.trim());
            if !same_ca && data.get(bootstrap::KUBECONFIG_KEY) != Some(&kubeconfig) {
                data.insert(bootstrap::KUBECONFIG_KEY.into(), kubeconfig);
                api.replace(bootstrap::CLUSTER_INFO, &PostParams::default(), &info).await?;
            }
        }
        None => {
            let info: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {"name": bootstrap::CLUSTER_INFO, "namespace": bootstrap::CLUSTER_INFO_NAMESPACE},
                "data": {bootstrap::KUBECONFIG_KEY: kubeconfig},
            }))?;
            api.create(&PostParams::default(), &info).await?;
        }
    }
    Ok(())
}

fn expires_in(t: &TokenSecret, now: jiff::Timestamp) -> (String, String) {
    match t.expiration {
        None => ("<forever>".into(), "<never>".into()),
        Some(e) => {
            let left = e.duration_since(now).as_secs().max(0);
            let ttl = if left >= 3600 {
                format!("{}h", left / 3600)
            } else if left >= 60 {
                format!("{}m", left / 60)
            } else {
                format!("{left}s")
            };
            (if e <= now { "<invalid>".into() } else { ttl }, e.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        }
    }
}

pub async fn run(args: TokenArgs) -> Result<()> {
    let kubeconfig = args.kubeconfig.clone().unwrap_or_else(|| args.data_dir.join("admin.kubeconfig"));
    let client = crate::components::kube_client(&kubeconfig).await.with_context(|| {
        format!("connecting with {} (pass --kubeconfig, or --data-dir of the server)", kubeconfig.display())
    })?;
    match args.command {
        TokenCommand::Create { token, ttl, description, usages, groups, print_join_command } => {
            let ttl = crate::agent::duration(&ttl, "--ttl")?;
            let token = new_token(token.as_deref(), ttl, description, usages, groups)?;
            create(&client, &token).await?;
            if print_join_command {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
                let cluster =
                    kc.clusters.first().and_then(|c| c.cluster.clone()).context("the kubeconfig names no cluster")?;
                let ca = crate::components::cluster_ca_pem(&kubeconfig)?;
                let server = client_server(&client, cluster.server.unwrap_or_default()).await;
                wait_signed(&client, &token.token, Duration::from_secs(30)).await?;
                println!("{}", join_command(&server, &token.token, &ca)?);
            } else {
                println!("{}", token.token);
            }
        }
        TokenCommand::List => {
            let now = jiff::Timestamp::now();
            let rows: Vec<[String; 6]> = list(&client)
                .await?
                .iter()
                .map(|t| {
                    let (ttl, expires) = expires_in(t, now);
                    [
                        t.token.to_string(),
                        ttl,
                        expires,
                        t.usages.join(","),
                        t.description.clone().unwrap_or_else(|| "<none>".into()),
                        t.extra_groups.join(","),
                    ]
                })
                .collect();
            let header = ["TOKEN", "TTL", "EXPIRES", "USAGES", "DESCRIPTION", "EXTRA GROUPS"].map(String::from);
            let widths: Vec<usize> =
                (0..6).map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0)).collect();
            for row in std::iter::once(&header).chain(&rows) {
                let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                println!("{}", line.join("   ").trim_end());
            }
        }
        TokenCommand::Delete { tokens } => {
            let api: Api<Secret> = Api::namespaced(client.clone(), bootstrap::SECRET_NAMESPACE);
            for t in tokens {
                let id = t.split_once('.').map(|(id, _)| id).unwrap_or(&t).to_string();
                if !bootstrap::valid_id(&id) {
                    anyhow::bail!("{t:?} is neither a token ID ([a-z0-9]{{6}}) nor a token");
                }
                match api.delete(&format!("{}{id}", bootstrap::SECRET_PREFIX), &DeleteParams::default()).await {
                    Ok(_) => println!("bootstrap token {id:?} deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!("bootstrap token {id:?} not found"),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// The address joining nodes should use: the one `cluster-info` publishes, else the
/// kubeconfig's.
async fn client_server(client: &kube::Client, fallback: String) -> String {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), bootstrap::CLUSTER_INFO_NAMESPACE);
    let published = api.get_opt(bootstrap::CLUSTER_INFO).await.ok().flatten().and_then(|c| {
        let text = c.data?.get(bootstrap::KUBECONFIG_KEY)?.clone();
        bootstrap::read_cluster_info_kubeconfig(&text).ok().map(|(server, _)| server)
    });
    published.unwrap_or(fallback)
}
