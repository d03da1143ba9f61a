//! A container's environment as upstream builds it: the service variables (unless
//! `enableServiceLinks: false`, only the `kubernetes` service's), `envFrom` (ConfigMaps
//! and Secrets, with prefixes), then `env` in order (values with `$(VAR)` references to earlier
//! variables, fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use kube::Api;

use super::spec::expand;

/// Values the pod knows only once it runs.
pub struct Runtime<'a> {
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
    /// The node's allocatable resources (the limits of a container that sets none).
    pub allocatable: &'a BTreeMap<String, String>,
}

/// A ConfigMap's keys as bytes: `data`, and `binaryData` too when `binary` (volumes use
/// both, the environment only `data`). Empty when it does not exist and is optional.
pub(super) async fn config_map_bytes(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
    binary: bool,
) -> Result<BTreeMap<String, Vec<u8>>> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(name).await? {
        Some(cm) => {
            let mut out: BTreeMap<String, Vec<u8>> =
                cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            if binary {
                out.extend(cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            }
            Ok(out)
        }
        None if optional => Ok(BTreeMap::new()),
        None => Err(anyhow!("configmap \"{name}\" not found")),
    }
}

/// A Secret's keys as bytes (`stringData`, overridden by `data`). Empty when it does not
/// exist and is optional.
pub(super) async fn secret_bytes(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>> {
    match Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await? {
        Some(s) => {
            let mut out: BTreeMap<String, Vec<u8>> =
                s.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            out.extend(s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            Ok(out)
        }
        None if optional => Ok(BTreeMap::new()),
        None => Err(anyhow!("secret \"{name}\" not found")),
    }
}

fn text(bytes: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    bytes.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect()
}

async fn config_map(client: &kube::Client, ns: &str, name: &str, optional: bool) -> Result<BTreeMap<String, String>> {
    Ok(text(config_map_bytes(client, ns, name, optional, false).await?))
}

async fn secret(client: &kube::Client, ns: &str, name: &str, optional: bool) -> Result<BTreeMap<String, String>> {
    Ok(text(secret_bytes(client, ns, name, optional).await?))
}

/// The value of a `fieldRef` path.
pub fn field(pod: &Pod, path: &str, rt: &Runtime) -> Result<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']")?;
        Some(map.as_ref().and_then(|m| m.get(key).cloned()).unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels", &meta.labels).or_else(|| keyed("metadata.annotations", &meta.annotations))
    {
        return Ok(v);
    }
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" | "status.podIPs" => rt.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => rt.host_ip.to_string(),
        other => return Err(anyhow!("unsupported fieldRef path {other:?}")),
    })
}

/// The value of a `resourceFieldRef` (limits default to the node's allocatable, which
/// the agent does not pass here: an unset limit reads as 0).
/// A container's resource as the downward API gives it (`limits.cpu`, `requests.memory`,
/// ...), divided by `divisor` and rounded up. An unset limit is the node's allocatable
/// amount, as upstream's kubelet reports it; an unset request is 0.
pub(super) fn resource_field(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    allocatable: &BTreeMap<String, String>,
) -> Result<String> {
    let (which, name) = resource.split_once('.').ok_or_else(|| anyhow!("unsupported resourceFieldRef {resource:?}"))?;
    let res = container.resources.as_ref();
    let set = match which {
        "limits" => res.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(name)).map(|q| q.0.as_str()),
        "requests" => res.and_then(|r| r.requests.as_ref()).and_then(|m| m.get(name)).map(|q| q.0.as_str()),
        _ => return Err(anyhow!("unsupported resourceFieldRef {resource:?}")),
    };
    let set = if which == "limits" { set.or(allocatable.get(name).map(String::as_str)) } else { set };
    let value = set.and_then(krate_api::quantity::parse).unwrap_or(0.0);
    let divisor = divisor.and_then(krate_api::quantity::parse).filter(|d| *d > 0.0).unwrap_or(1.0);
    Ok(((value / divisor).ceil() as i64).to_string())
}

/// The variables one Service gives pods (`{NAME}_SERVICE_HOST`, `{NAME}_SERVICE_PORT`,
/// and the Docker-link style `{NAME}_PORT_...`), empty for headless services.
fn service_vars(svc: &Service) -> Vec<(String, String)> {
    let Some(spec) = svc.spec.as_ref() else { return vec![] };
    let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else { return vec![] };
    let Some(ports) = spec.ports.as_ref().filter(|p| !p.is_empty()) else { return vec![] };
    let name = svc.metadata.name.as_deref().unwrap_or_default().to_uppercase().replace('-', "_");
    let mut out = vec![
        (format!("{name}_SERVICE_HOST"), ip.to_string()),
        (format!("{name}_SERVICE_PORT"), ports[0].port.to_string()),
    ];
    for p in ports {
        if let Some(port_name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            out.push((
                format!("{name}_SERVICE_PORT_{}", port_name.to_uppercase().replace('-', "_")),
                p.port.to_string(),
            ));
        }
    }
    let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
    out.push((format!("{name}_PORT"), format!("{}://{ip}:{}", proto(&ports[0]).to_lowercase(), ports[0].port)));
    for p in ports {
        let prefix = format!("{name}_PORT_{}_{}", p.port, proto(p));
        out.push((prefix.clone(), format!("{}://{ip}:{}", proto(p).to_lowercase(), p.port)));
        out.push((format!("{prefix}_PROTO"), proto(p).to_lowercase()));
        out.push((format!("{prefix}_PORT"), p.port.to_string()));
        out.push((format!("{prefix}_ADDR"), ip.to_string()));
    }
    out
}

/// The service variables of a pod in `ns`: the `kubernetes` service's always, the
/// namespace's other services' when service links are on.
async fn service_environment(client: &kube::Client, ns: &str, links: bool) -> Result<Vec<(String, String)>> {
    let mut services: Vec<Service> = Vec::new();
    if links {
        services.extend(Api::<Service>::namespaced(client.clone(), ns).list(&Default::default()).await?.items);
    }
    if !links || ns != "default" {
        services.extend(Api::<Service>::namespaced(client.clone(), "default").get_opt("kubernetes").await?);
    }
    Ok(services.iter().flat_map(service_vars).collect())
}

/// The container's environment, in order, with later definitions replacing earlier ones.
pub async fn resolve(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    rt: &Runtime<'_>,
) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
    for (k, v) in service_environment(client, ns, links).await.context("listing the services for the environment")? {
        set(&mut vars, k, v);
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            config_map(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else if let Some(r) = &from.secret_ref {
            secret(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            set(&mut vars, format!("{prefix}{k}"), v);
        }
    }
    for e in container.env.iter().flatten() {
        let value = match &e.value_from {
            None => expand(e.value.as_deref().unwrap_or_default(), &vars),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    field(pod, &f.field_path, rt)?
                } else if let Some(r) = &from.resource_field_ref {
                    resource_field(container, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()), rt.allocatable)?
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match config_map(client, ns, &r.name, optional).await?.remove(&r.key) {
                        Some(v) => v,
                        None if optional => continue,
                        None => return Err(anyhow!("couldn't find key {} in ConfigMap {ns}/{}", r.key, r.name)),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match secret(client, ns, &r.name, optional).await.context("reading a secretKeyRef")?.remove(&r.key)
                    {
                        Some(v) => v,
                        None if optional => continue,
                        None => return Err(anyhow!("couldn't find key {} in Secret {ns}/{}", r.key, r.name)),
                    }
                } else {
                    String::new()
                }
            }
        };
        set(&mut vars, e.name.clone(), value);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars[&k].clone();
            (k, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_paths() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"}}, "spec": {"nodeName": "n1", "containers": []}})).unwrap();
        let allocatable = BTreeMap::new();
        let rt = Runtime { pod_ip: "10.42.0.5", host_ip: "127.0.0.1", allocatable: &allocatable };
        assert_eq!(field(&pod, "metadata.labels['app']", &rt).unwrap(), "web");
        assert_eq!(field(&pod, "metadata.annotations['x']", &rt).unwrap(), "");
        assert_eq!(field(&pod, "spec.nodeName", &rt).unwrap(), "n1");
        assert_eq!(field(&pod, "status.podIP", &rt).unwrap(), "10.42.0.5");
        assert!(field(&pod, "spec.bogus", &rt).is_err());
    }

    #[test]
    fn services_give_upstream_variables() {
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": "my-db"}, "spec": {"clusterIP": "10.43.0.7", "ports": [{"name": "sql", "port": 5432}, {"port": 53, "protocol": "UDP"}]}})).unwrap();
        let vars: BTreeMap<String, String> = service_vars(&svc).into_iter().collect();
        assert_eq!(vars["MY_DB_SERVICE_HOST"], "10.43.0.7");
        assert_eq!(vars["MY_DB_SERVICE_PORT"], "5432");
        assert_eq!(vars["MY_DB_SERVICE_PORT_SQL"], "5432");
        assert_eq!(vars["MY_DB_PORT"], "tcp://10.43.0.7:5432");
        assert_eq!(vars["MY_DB_PORT_53_UDP"], "udp://10.43.0.7:53");
        assert_eq!(vars["MY_DB_PORT_53_UDP_ADDR"], "10.43.0.7");
        let headless: Service = serde_json::from_value(
            json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        )
        .unwrap();
        assert!(service_vars(&headless).is_empty());
    }

    #[test]
    fn resource_fields_round_up_by_divisor() {
        let c: Container =
            serde_json::from_value(json!({"name": "c", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}}}))
                .unwrap();
        let node =
            BTreeMap::from([("cpu".to_string(), "1500m".to_string()), ("memory".to_string(), "2Gi".to_string())]);
        assert_eq!(resource_field(&c, "limits.cpu", None, &node).unwrap(), "1");
        assert_eq!(resource_field(&c, "limits.cpu", Some("1m"), &node).unwrap(), "250");
        assert_eq!(resource_field(&c, "limits.memory", Some("1Mi"), &node).unwrap(), "64");
        // No limits: the node's allocatable; no requests: 0.
        let bare: Container = serde_json::from_value(json!({"name": "c"})).unwrap();
        assert_eq!(resource_field(&bare, "limits.cpu", Some("1m"), &node).unwrap(), "1500");
        assert_eq!(resource_field(&bare, "limits.memory", None, &node).unwrap(), (2u64 << 30).to_string());
        assert_eq!(resource_field(&bare, "requests.cpu", None, &node).unwrap(), "0");
    }
}
