//! From a Pod to CRI configurations: the sandbox, and each container's command, env,
//! working directory, resources (cgroups) and security context.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::cri::api;

/// Labels (CRI filters on them) and annotations the agent puts on sandboxes and containers.
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const MANAGED_BY: &str = "io.krate.managed-by";
pub const MANAGED_BY_AGENT: &str = "krate-agent";

pub fn pod_key(pod: &Pod) -> (String, String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
        pod.metadata.uid.clone().unwrap_or_default(),
    )
}

/// Where the runtime writes the pod's container logs (upstream's /var/log/pods layout).
pub fn log_directory(root: &Path, pod: &Pod) -> std::path::PathBuf {
    let (ns, name, uid) = pod_key(pod);
    root.join(format!("{ns}_{name}_{uid}"))
}

pub fn sandbox_config(pod: &Pod, attempt: u32, log_root: &Path, dns: &super::dns::PodDns) -> api::PodSandboxConfig {
    let (ns, name, uid) = pod_key(pod);
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    // A pod on the host's network shares the host's UTS namespace too, so it gets no
    // hostname of its own (as upstream's kubelet: runc refuses to set one there).
    let hostname = if host_network {
        String::new()
    } else {
        spec.and_then(|s| s.hostname.clone()).unwrap_or_else(|| name.chars().take(63).collect())
    };
    let mut labels: HashMap<String, String> = pod.metadata.labels.clone().unwrap_or_default().into_iter().collect();
    labels.insert(POD_UID.into(), uid.clone());
    labels.insert(POD_NAME.into(), name.clone());
    labels.insert(POD_NAMESPACE.into(), ns.clone());
    labels.insert(MANAGED_BY.into(), MANAGED_BY_AGENT.into());
    let host_pid = spec.and_then(|s| s.host_pid).unwrap_or(false);
    let host_ipc = spec.and_then(|s| s.host_ipc).unwrap_or(false);
    let mode = |host: bool| if host { api::NamespaceMode::Node as i32 } else { api::NamespaceMode::Pod as i32 };
    let port_mappings = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.unwrap_or(0) > 0)
        .map(|p| api::PortMapping {
            protocol: match p.protocol.as_deref() {
                Some("UDP") => api::Protocol::Udp as i32,
                Some("SCTP") => api::Protocol::Sctp as i32,
                _ => api::Protocol::Tcp as i32,
            },
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata { name, uid, namespace: ns, attempt }),
        hostname,
        log_directory: log_directory(log_root, pod).display().to_string(),
        dns_config: Some(dns.config(pod)),
        port_mappings,
        labels,
        annotations: pod.metadata.annotations.clone().unwrap_or_default().into_iter().collect(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: mode(host_network),
                    pid: if host_pid { api::NamespaceMode::Node as i32 } else { api::NamespaceMode::Container as i32 },
                    ipc: mode(host_ipc),
                    ..Default::default()
                }),
                // A privileged container needs a privileged sandbox (containerd refuses
                // it otherwise), as upstream's kubelet asks for.
                privileged: spec.is_some_and(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                        .any(|c| c.security_context.as_ref().and_then(|sc| sc.privileged).unwrap_or(false))
                }),
                ..Default::default()
            }),
            // The pod's namespaced sysctls, set in its sandbox (upstream's kubelet).
            sysctls: spec
                .and_then(|s| s.security_context.as_ref()?.sysctls.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s.name, s.value))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node ports the pod's containers ask for (`hostPort`), forwarded to `pod_ip` by
/// the node's proxy.
pub fn host_ports(pod: &Pod, pod_ip: &str) -> Vec<krate_net::catalog::HostPort> {
    let Ok(pod_ip) = pod_ip.parse() else { return vec![] };
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let host_port = u16::try_from(p.host_port.filter(|h| *h > 0)?).ok()?;
            Some(krate_net::catalog::HostPort {
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                host_ip: p
                    .host_ip
                    .as_deref()
                    .and_then(|ip| ip.parse().ok())
                    .filter(|ip: &std::net::Ipv4Addr| !ip.is_unspecified()),
                host_port,
                pod_ip,
                container_port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect()
}

/// Replaces `$(VAR)` with the variable's value when it is defined; `$$(VAR)` stays
/// `$(VAR)` literally; references to undefined variables are kept as written (upstream).
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A resource amount in the unit CRI wants (millicores, bytes).
fn amount(container: &Container, which: &str, resource: &str, scale: f64) -> Option<i64> {
    let resources = container.resources.as_ref()?;
    let map = if which == "limits" { resources.limits.as_ref() } else { resources.requests.as_ref() }?;
    krate_api::quantity::parse(&map.get(resource)?.0).map(|v| (v * scale).round() as i64)
}

/// The container's resources as its spec states them (`{}` for none), the form a
/// container status reports them in.
pub fn resources_json(container: &Container) -> serde_json::Value {
    let mut out = serde_json::json!({});
    let resources = container.resources.as_ref();
    for (key, map) in [
        ("requests", resources.and_then(|r| r.requests.as_ref())),
        ("limits", resources.and_then(|r| r.limits.as_ref())),
    ] {
        if let Some(map) = map.filter(|m| !m.is_empty()) {
            out[key] = serde_json::to_value(map).unwrap_or_default();
        }
    }
    out
}

/// The first of CPU and memory whose request or limit differs between `have` and `want`
/// (in `resources_json`'s form) and whose resize policy says RestartContainer.
pub fn resize_restarts(
    container: &Container,
    have: &serde_json::Value,
    want: &serde_json::Value,
) -> Option<&'static str> {
    ["cpu", "memory"].into_iter().find(|resource| {
        let changed = ["requests", "limits"].iter().any(|k| have[k][resource] != want[k][resource]);
        let restart = container
            .resize_policy
            .iter()
            .flatten()
            .any(|p| p.resource_name == *resource && p.restart_policy == "RestartContainer");
        changed && restart
    })
}

/// cgroup settings as upstream derives them: shares from the CPU request, a CFS quota
/// from the CPU limit, the memory limit as is.
pub fn linux_resources(container: &Container) -> api::LinuxContainerResources {
    const PERIOD: i64 = 100_000;
    let cpu_request =
        amount(container, "requests", "cpu", 1000.0).or_else(|| amount(container, "limits", "cpu", 1000.0));
    let cpu_limit = amount(container, "limits", "cpu", 1000.0);
    api::LinuxContainerResources {
        cpu_shares: cpu_request.map(|m| (m * 1024 / 1000).max(2)).unwrap_or(2),
        cpu_period: if cpu_limit.is_some() { PERIOD } else { 0 },
        cpu_quota: cpu_limit.map(|m| (m * PERIOD / 1000).max(1000)).unwrap_or(0),
        memory_limit_in_bytes: amount(container, "limits", "memory", 1.0).unwrap_or(0),
        ..Default::default()
    }
}

pub fn security_context(pod: &Pod, container: &Container) -> api::LinuxContainerSecurityContext {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let run_as_user = sc.and_then(|s| s.run_as_user).or_else(|| pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc.and_then(|s| s.run_as_group).or_else(|| pod_sc.and_then(|s| s.run_as_group));
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let host_pid = pod.spec.as_ref().and_then(|s| s.host_pid).unwrap_or(false);
    api::LinuxContainerSecurityContext {
        capabilities: caps.map(|c| api::Capability {
            add_capabilities: c.add.clone().unwrap_or_default(),
            drop_capabilities: c.drop.clone().unwrap_or_default(),
            ..Default::default()
        }),
        privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
        readonly_rootfs: sc.and_then(|s| s.read_only_root_filesystem).unwrap_or(false),
        run_as_user: run_as_user.map(|value| api::Int64Value { value }),
        run_as_group: run_as_group.map(|value| api::Int64Value { value }),
        // The pod's fsGroup owns its volumes: its processes are in it (upstream's kubelet).
        supplemental_groups: pod_sc
            .and_then(|s| s.supplemental_groups.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(pod_sc.and_then(|s| s.fs_group))
            .collect(),
        no_new_privs: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        namespace_options: Some(api::NamespaceOption {
            pid: if host_pid { api::NamespaceMode::Node as i32 } else { api::NamespaceMode::Container as i32 },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Everything CRI needs to create one container of the pod.
pub struct ContainerPlan<'a> {
    pub pod: &'a Pod,
    pub container: &'a Container,
    pub image_ref: String,
    pub restart_count: u32,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<api::Mount>,
    /// An ephemeral container's target: the id of the container whose process
    /// namespace it joins.
    pub pid_target: Option<String>,
}

impl ContainerPlan<'_> {
    fn security_context(&self) -> api::LinuxContainerSecurityContext {
        let mut sc = security_context(self.pod, self.container);
        if let (Some(target), Some(ns)) = (&self.pid_target, sc.namespace_options.as_mut()) {
            ns.pid = api::NamespaceMode::Target as i32;
            ns.target_id = target.clone();
        }
        sc
    }

    pub fn config(&self) -> api::ContainerConfig {
        let (ns, name, uid) = pod_key(self.pod);
        let c = self.container;
        let vars: BTreeMap<String, String> = self.env.iter().cloned().collect();
        let expand_all =
            |list: &Option<Vec<String>>| list.iter().flatten().map(|s| expand(s, &vars)).collect::<Vec<_>>();
        let mut labels = HashMap::from([
            (POD_UID.to_string(), uid),
            (POD_NAME.to_string(), name),
            (POD_NAMESPACE.to_string(), ns),
            (CONTAINER_NAME.to_string(), c.name.clone()),
            (MANAGED_BY.to_string(), MANAGED_BY_AGENT.to_string()),
        ]);
        labels.shrink_to_fit();
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata { name: c.name.clone(), attempt: self.restart_count }),
            image: Some(api::ImageSpec {
                image: self.image_ref.clone(),
                user_specified_image: c.image.clone().unwrap_or_default(),
                ..Default::default()
            }),
            command: expand_all(&c.command),
            args: expand_all(&c.args),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs: self
                .env
                .iter()
                .map(|(key, value)| api::KeyValue { key: key.clone(), value: value.clone() })
                .collect(),
            mounts: self.mounts.clone(),
            labels,
            annotations: HashMap::from([
                (RESTART_COUNT.to_string(), self.restart_count.to_string()),
                (
                    "io.kubernetes.container.terminationMessagePath".to_string(),
                    c.termination_message_path.clone().unwrap_or_else(|| "/dev/termination-log".into()),
                ),
            ]),
            log_path: format!("{}/{}.log", c.name, self.restart_count),
            stdin: c.stdin.unwrap_or(false),
            stdin_once: c.stdin_once.unwrap_or(false),
            tty: c.tty.unwrap_or(false),
            linux: Some(api::LinuxContainerConfig {
                resources: Some(linux_resources(c)),
                security_context: Some(self.security_context()),
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_upstream_rules() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string()), ("B".to_string(), "y".to_string())]);
        assert_eq!(expand("$(A)-$(B)", &vars), "x-y");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(C)", &vars), "$(C)");
        assert_eq!(expand("cost $5 $(A", &vars), "cost $5 $(A");
        assert_eq!(expand("plain", &vars), "plain");
    }

    #[test]
    fn a_resize_restarts_a_container_only_for_a_changed_resource_whose_policy_says_so() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c",
            "resources": {"requests": {"cpu": "25m", "memory": "35Mi"}},
            "resizePolicy": [{"resourceName": "memory", "restartPolicy": "RestartContainer"}]}))
        .unwrap();
        let want = resources_json(&c);
        assert_eq!(want, serde_json::json!({"requests": {"cpu": "25m", "memory": "35Mi"}}));
        let cpu_only = serde_json::json!({"requests": {"cpu": "20m", "memory": "35Mi"}});
        assert_eq!(resize_restarts(&c, &cpu_only, &want), None);
        let memory = serde_json::json!({"requests": {"cpu": "25m", "memory": "30Mi"}});
        assert_eq!(resize_restarts(&c, &memory, &want), Some("memory"));
        let none: Container = serde_json::from_value(serde_json::json!({"name": "c"})).unwrap();
        assert_eq!(resources_json(&none), serde_json::json!({}));
    }

    #[test]
    fn cgroup_settings_come_from_requests_and_limits() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c", "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}}})).unwrap();
        let r = linux_resources(&c);
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.cpu_period, r.memory_limit_in_bytes),
            (256, 50_000, 100_000, 64 << 20)
        );
        let none: Container = serde_json::from_value(serde_json::json!({"name": "c"})).unwrap();
        assert_eq!((linux_resources(&none).cpu_shares, linux_resources(&none).memory_limit_in_bytes), (2, 0));
    }
}
