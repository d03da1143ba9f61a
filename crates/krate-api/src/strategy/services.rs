//! Services and the objects that route to pods.

use serde_json::{json, Value};

use super::{Errors, Strategy};
use crate::error::FieldError;
use crate::object::{default, for_each_mut, get, get_str};

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
/// Upstream's default and largest ClientIP affinity timeouts (seconds).
const DEFAULT_AFFINITY_SECONDS: i64 = 10800;
const MAX_AFFINITY_SECONDS: i64 = 86400;
const IP_EXAMPLE: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";

fn service_type(svc: &Value) -> &str {
    get_str(svc, &["spec", "type"]).filter(|t| !t.is_empty()).unwrap_or("ClusterIP")
}

fn cluster_ips(svc: &Value) -> Vec<String> {
    get(svc, &["spec", "clusterIPs"])
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn cluster_ip(svc: &Value) -> &str {
    get_str(svc, &["spec", "clusterIP"]).unwrap_or_default()
}

/// Whether the Service gets cluster IPs (all but ExternalName).
pub fn needs_cluster_ip(svc: &Value) -> bool {
    service_type(svc) != "ExternalName"
}

/// Whether the Service's ports get node ports.
pub fn needs_node_ports(svc: &Value) -> bool {
    match service_type(svc) {
        "NodePort" => true,
        "LoadBalancer" => get(svc, &["spec", "allocateLoadBalancerNodePorts"]).and_then(Value::as_bool) != Some(false),
        _ => false,
    }
}

/// Whether the Service gets a health check node port (a LoadBalancer keeping traffic local).
pub fn needs_health_check_node_port(svc: &Value) -> bool {
    service_type(svc) == "LoadBalancer" && get_str(svc, &["spec", "externalTrafficPolicy"]) == Some("Local")
}

/// Reachable from outside the cluster: NodePort, LoadBalancer, or with externalIPs.
fn externally_accessible(svc: &Value) -> bool {
    matches!(service_type(svc), "NodePort" | "LoadBalancer")
        || (service_type(svc) == "ClusterIP"
            && get(svc, &["spec", "externalIPs"]).and_then(Value::as_array).is_some_and(|a| !a.is_empty()))
}

fn node_ports(svc: &Value) -> Vec<i64> {
    let ports = get(svc, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
    ports.iter().filter_map(|p| p.get("nodePort").and_then(Value::as_i64)).filter(|n| *n != 0).collect()
}

/// `clusterIPs` follows a `clusterIP` given alone (upstream's normalizeClusterIPs).
fn normalize_cluster_ips(svc: &mut Value, old: Option<&Value>) {
    let ip = cluster_ip(svc).to_string();
    let ips = cluster_ips(svc);
    match old {
        None => {
            if !ip.is_empty() && ips.is_empty() {
                crate::object::set(svc, &["spec", "clusterIPs"], json!([ip]));
            }
        }
        Some(old) => {
            let old_ips = cluster_ips(old);
            if ips.is_empty() && ip == cluster_ip(old) && !old_ips.is_empty() {
                crate::object::set(svc, &["spec", "clusterIPs"], json!(old_ips));
            } else if !ip.is_empty() && ip != cluster_ip(old) && ips == old_ips {
                crate::object::set(svc, &["spec", "clusterIPs"], json!([ip]));
            }
        }
    }
}

/// What an update keeps of the old object when the client left it out: the cluster
/// IPs and families, node ports (matched by port name, unless another port took them)
/// and the health check node port (upstream's patchAllocatedValues).
fn keep_allocated_values(new: &mut Value, old: &Value) {
    if needs_cluster_ip(old) && needs_cluster_ip(new) {
        if cluster_ip(new).is_empty() {
            crate::object::set(new, &["spec", "clusterIP"], json!(cluster_ip(old)));
        }
        if cluster_ips(new).is_empty() && !cluster_ips(old).is_empty() {
            crate::object::set(new, &["spec", "clusterIPs"], json!(cluster_ips(old)));
        }
        for field in ["ipFamilies", "ipFamilyPolicy"] {
            if get(new, &["spec", field]).is_none_or(Value::is_null) {
                if let Some(v) = get(old, &["spec", field]).cloned() {
                    crate::object::set(new, &["spec", field], v);
                }
            }
        }
    }
    if needs_node_ports(old) && needs_node_ports(new) {
        let used: Vec<i64> = node_ports(new);
        let by_name: Vec<(String, i64)> = get(old, &["spec", "ports"])
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| (get_str(p, &["name"]).unwrap_or_default().to_string(), p["nodePort"].as_i64().unwrap_or(0)))
            .collect();
        for_each_mut(new, &["spec", "ports"], |p| {
            if p.get("nodePort").and_then(Value::as_i64).unwrap_or(0) == 0 {
                let name = get_str(p, &["name"]).unwrap_or_default();
                if let Some((_, old_port)) = by_name.iter().find(|(n, _)| n == name) {
                    if *old_port != 0 && !used.contains(old_port) {
                        p["nodePort"] = json!(old_port);
                    }
                }
            }
        });
    }
    if needs_health_check_node_port(old) && needs_health_check_node_port(new) {
        let new_hc = get(new, &["spec", "healthCheckNodePort"]).and_then(Value::as_i64).unwrap_or(0);
        if new_hc == 0 {
            if let Some(v) = get(old, &["spec", "healthCheckNodePort"]).cloned() {
                crate::object::set(new, &["spec", "healthCheckNodePort"], v);
            }
        }
    }
}

/// Clears what a type change made meaningless, where the server set it and the client
/// did not ask for it (upstream's dropTypeDependentFields).
fn drop_type_dependent_fields(new: &mut Value, old: &Value) {
    let same = |path: &[&str], new: &Value| get(new, path) == get(old, path);
    if needs_cluster_ip(old) && !needs_cluster_ip(new) {
        if same(&["spec", "clusterIP"], new) && same(&["spec", "clusterIPs"], new) {
            crate::object::remove(new, &["spec", "clusterIP"]);
            crate::object::remove(new, &["spec", "clusterIPs"]);
        }
        for field in ["ipFamilies", "ipFamilyPolicy"] {
            if same(&["spec", field], new) {
                crate::object::remove(new, &["spec", field]);
            }
        }
    }
    if needs_node_ports(old) && !needs_node_ports(new) {
        let old_ports = node_ports(old);
        if node_ports(new).iter().all(|p| old_ports.contains(p)) {
            for_each_mut(new, &["spec", "ports"], |p| {
                if let Some(m) = p.as_object_mut() {
                    m.remove("nodePort");
                }
            });
        }
    }
    if needs_health_check_node_port(old)
        && !needs_health_check_node_port(new)
        && same(&["spec", "healthCheckNodePort"], new)
    {
        crate::object::remove(new, &["spec", "healthCheckNodePort"]);
    }
    if service_type(new) != "LoadBalancer" {
        for field in ["allocateLoadBalancerNodePorts", "loadBalancerClass"] {
            if same(&["spec", field], new) {
                crate::object::remove(new, &["spec", field]);
            }
        }
        crate::object::set(new, &["status", "loadBalancer"], json!({}));
    }
    if !externally_accessible(new) && same(&["spec", "externalTrafficPolicy"], new) {
        crate::object::remove(new, &["spec", "externalTrafficPolicy"]);
    }
}

pub struct ServiceStrategy;

impl Strategy for ServiceStrategy {
    fn default(&self, obj: &mut Value) {
        default(obj, &["spec", "type"], json!("ClusterIP"));
        default(obj, &["spec", "sessionAffinity"], json!("None"));
        match get_str(obj, &["spec", "sessionAffinity"]) {
            Some("ClientIP") => {
                let timeout = obj.pointer("/spec/sessionAffinityConfig/clientIP/timeoutSeconds");
                if timeout.is_none_or(Value::is_null) {
                    crate::object::set(
                        obj,
                        &["spec", "sessionAffinityConfig"],
                        json!({"clientIP": {"timeoutSeconds": DEFAULT_AFFINITY_SECONDS}}),
                    );
                }
            }
            Some("None") => {
                crate::object::remove(obj, &["spec", "sessionAffinityConfig"]);
            }
            _ => {}
        }
        let service_type = service_type(obj).to_string();
        for_each_mut(obj, &["spec", "ports"], |p| {
            default(p, &["protocol"], json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                let target = p.get("targetPort").cloned().unwrap_or(Value::Null);
                if [Value::Null, json!(0), json!("")].contains(&target) {
                    p["targetPort"] = port;
                }
            }
        });
        if service_type != "ExternalName" {
            default(obj, &["spec", "internalTrafficPolicy"], json!("Cluster"));
        }
        if externally_accessible(obj) {
            default(obj, &["spec", "externalTrafficPolicy"], json!("Cluster"));
        }
        if service_type == "LoadBalancer" {
            default(obj, &["spec", "allocateLoadBalancerNodePorts"], json!(true));
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        normalize_cluster_ips(obj, None);
    }

    fn prepare_for_update(&self, new: &mut Value, old: &Value) {
        keep_allocated_values(new, old);
        normalize_cluster_ips(new, Some(old));
        drop_type_dependent_fields(new, old);
    }

    fn initial_status(&self, _obj: &Value) -> Option<Value> {
        Some(json!({"loadBalancer": {}}))
    }

    fn validate(&self, obj: &Value, errs: &mut Errors) {
        let service_type = service_type(obj);
        if !SERVICE_TYPES.contains(&service_type) {
            errs.push(FieldError::not_supported("spec.type", &json!(service_type), SERVICE_TYPES));
        }
        validate_cluster_ips(obj, service_type, errs);
        let headless = cluster_ips(obj) == ["None"];
        let ports = get(obj, &["spec", "ports"]).and_then(Value::as_array).cloned().unwrap_or_default();
        if service_type == "ExternalName" {
            match get_str(obj, &["spec", "externalName"]).filter(|n| !n.is_empty()) {
                None => errs.push(FieldError::required("spec.externalName", "")),
                Some(name) => {
                    let name = name.strip_suffix('.').unwrap_or(name);
                    let problems = crate::validation::is_dns1123_subdomain(name);
                    if !problems.is_empty() {
                        errs.push(FieldError::invalid("spec.externalName", &json!(name), &problems.join(", ")));
                    }
                }
            }
        } else if ports.is_empty() && !headless {
            errs.push(FieldError::required("spec.ports", ""));
        }
        let mut names = std::collections::HashSet::new();
        let mut node_ports = std::collections::HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                errs.push(FieldError::invalid(
                    format!("spec.ports[{i}].port"),
                    &json!(port),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            let name = get_str(p, &["name"]).unwrap_or_default();
            if ports.len() > 1 && name.is_empty() {
                errs.push(FieldError::required(format!("spec.ports[{i}].name"), ""));
            }
            if !name.is_empty() && !names.insert(name.to_string()) {
                errs.push(FieldError::duplicate(format!("spec.ports[{i}].name"), &json!(name)));
            }
            let protocol = get_str(p, &["protocol"]).unwrap_or("TCP");
            if !["TCP", "UDP", "SCTP"].contains(&protocol) {
                errs.push(FieldError::not_supported(
                    format!("spec.ports[{i}].protocol"),
                    &json!(protocol),
                    &["SCTP", "TCP", "UDP"],
                ));
            }
            let node_port = p.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
            if node_port != 0 {
                if service_type == "ClusterIP" {
                    errs.push(FieldError::forbidden(
                        format!("spec.ports[{i}].nodePort"),
                        "may not be used when `type` is 'ClusterIP'",
                    ));
                } else if !node_ports.insert((protocol.to_string(), node_port)) {
                    errs.push(FieldError::duplicate(format!("spec.ports[{i}].nodePort"), &json!(node_port)));
                }
            }
        }
        match get_str(obj, &["spec", "sessionAffinity"]) {
            Some("None" | "ClientIP") | None => {}
            Some(other) => {
                errs.push(FieldError::not_supported("spec.sessionAffinity", &json!(other), &["ClientIP", "None"]))
            }
        }
        if let Some(t) = obj.pointer("/spec/sessionAffinityConfig/clientIP/timeoutSeconds").and_then(Value::as_i64) {
            if !(1..=MAX_AFFINITY_SECONDS).contains(&t) {
                errs.push(FieldError::invalid(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    &json!(t),
                    &format!("must be greater than 0 and less than {MAX_AFFINITY_SECONDS}"),
                ));
            }
        }
        for (policy, allowed) in
            [("externalTrafficPolicy", &["Cluster", "Local"]), ("internalTrafficPolicy", &["Cluster", "Local"])]
        {
            if let Some(v) = get_str(obj, &["spec", policy]).filter(|v| !v.is_empty()) {
                if !allowed.contains(&v) {
                    errs.push(FieldError::not_supported(format!("spec.{policy}"), &json!(v), allowed));
                }
            }
        }
    }

    fn validate_update(&self, new: &Value, old: &Value, errs: &mut Errors) {
        self.validate(new, errs);
        if !needs_cluster_ip(old) || !needs_cluster_ip(new) {
            return;
        }
        let (old_ips, new_ips) = (cluster_ips(old), cluster_ips(new));
        match (old_ips.first(), new_ips.first()) {
            (Some(_), None) => {
                errs.push(FieldError::invalid("spec.clusterIPs[0]", &Value::Null, "primary clusterIP can not be unset"))
            }
            (Some(o), Some(n)) if o != n => {
                errs.push(FieldError::invalid("spec.clusterIPs[0]", &json!(new_ips), "may not change once set"))
            }
            _ => {}
        }
    }
}

/// `clusterIP` and `clusterIPs`: valid addresses, agreeing with each other, `None` only
/// alone and not for NodePort or LoadBalancer, nothing for ExternalName.
fn validate_cluster_ips(obj: &Value, service_type: &str, errs: &mut Errors) {
    let ip = cluster_ip(obj);
    let ips = cluster_ips(obj);
    if service_type == "ExternalName" {
        if !ip.is_empty() || !ips.is_empty() {
            errs.push(FieldError::forbidden("spec.clusterIPs", "may not be set for ExternalName services"));
        }
        for field in ["ipFamilies", "ipFamilyPolicy"] {
            if get(obj, &["spec", field]).is_some_and(|v| !v.is_null() && v != &json!([])) {
                errs.push(FieldError::forbidden(format!("spec.{field}"), "may not be set for ExternalName services"));
            }
        }
        return;
    }
    if ip.is_empty() {
        if !ips.is_empty() {
            errs.push(FieldError::invalid(
                "spec.clusterIPs",
                &json!(ips),
                "must be empty when `clusterIP` is not specified",
            ));
        }
        return;
    }
    if ips.first().map(String::as_str) != Some(ip) {
        errs.push(FieldError::invalid("spec.clusterIPs", &json!(ips), "first value must match `clusterIP`"));
        return;
    }
    if ips.len() > 2 {
        errs.push(FieldError::invalid("spec.clusterIPs", &json!(ips), "may only hold up to 2 values"));
        return;
    }
    if ips.iter().any(|i| i == "None") {
        if ips.len() > 1 {
            errs.push(FieldError::invalid("spec.clusterIPs", &json!(ips), "'None' must be the first and only value"));
        } else if matches!(service_type, "NodePort" | "LoadBalancer") {
            errs.push(FieldError::invalid(
                "spec.clusterIPs[0]",
                &json!("None"),
                &format!("may not be set to 'None' for {service_type} services"),
            ));
        }
        return;
    }
    let mut families = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        match ip.parse::<std::net::IpAddr>() {
            Ok(addr) => families.push(addr.is_ipv4()),
            Err(_) => errs.push(FieldError::invalid(format!("spec.clusterIPs[{i}]"), &json!(ip), IP_EXAMPLE)),
        }
    }
    if families.len() == 2 && families[0] == families[1] {
        errs.push(FieldError::invalid(
            "spec.clusterIPs",
            &json!(ips),
            "may specify no more than one IP for each IP family",
        ));
    }
}

pub struct EndpointsStrategy;
impl Strategy for EndpointsStrategy {
    fn default(&self, obj: &mut Value) {
        for_each_mut(obj, &["subsets"], |s| for_each_mut(s, &["ports"], |p| default(p, &["protocol"], json!("TCP"))));
    }
}

pub struct EndpointSliceStrategy;
impl Strategy for EndpointSliceStrategy {
    fn default(&self, obj: &mut Value) {
        for_each_mut(obj, &["ports"], |p| {
            default(p, &["protocol"], json!("TCP"));
            default(p, &["name"], json!(""));
        });
    }
    fn validate(&self, obj: &Value, errs: &mut Errors) {
        match get_str(obj, &["addressType"]) {
            Some("IPv4" | "IPv6" | "FQDN") => {}
            other => errs.push(FieldError::not_supported(
                "addressType",
                &json!(other.unwrap_or_default()),
                &["FQDN", "IPv4", "IPv6"],
            )),
        }
    }
}

pub struct NetworkPolicyStrategy;
impl Strategy for NetworkPolicyStrategy {
    fn default(&self, obj: &mut Value) {
        for direction in ["ingress", "egress"] {
            for_each_mut(obj, &["spec", direction], |rule| {
                for_each_mut(rule, &["ports"], |p| default(p, &["protocol"], json!("TCP")));
            });
        }
        if get(obj, &["spec", "policyTypes"]).is_none() {
            let mut types = vec![json!("Ingress")];
            if get(obj, &["spec", "egress"]).is_some_and(|e| !e.is_null()) {
                types.push(json!("Egress"));
            }
            crate::object::set(obj, &["spec", "policyTypes"], Value::Array(types));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(svc: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        ServiceStrategy.validate(svc, &mut errs);
        errs.iter().map(FieldError::to_line).collect()
    }

    #[test]
    fn cluster_ips_are_checked_as_upstream() {
        let svc = |ip: &str, ips: Value, t: &str| json!({"spec": {"type": t, "clusterIP": ip, "clusterIPs": ips, "ports": [{"port": 80}]}});
        assert!(errors_of(&svc("10.43.0.5", json!(["10.43.0.5"]), "ClusterIP")).is_empty());
        assert_eq!(
            errors_of(&svc("abc", json!(["abc"]), "ClusterIP")),
            [
                r#"spec.clusterIPs[0]: Invalid value: "abc": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"#
            ]
        );
        assert_eq!(
            errors_of(&svc("10.43.0.5", json!(["10.43.0.6"]), "ClusterIP")),
            [r#"spec.clusterIPs: Invalid value: ["10.43.0.6"]: first value must match `clusterIP`"#]
        );
        assert_eq!(
            errors_of(&svc("None", json!(["None"]), "NodePort")),
            [r#"spec.clusterIPs[0]: Invalid value: "None": may not be set to 'None' for NodePort services"#]
        );
        let external = json!({"spec": {"type": "ExternalName", "externalName": "Foo_Bar", "clusterIP": "10.43.0.5"}});
        let lines = errors_of(&external);
        assert_eq!(lines[0], "spec.clusterIPs: Forbidden: may not be set for ExternalName services");
        assert!(
            lines[1].starts_with(r#"spec.externalName: Invalid value: "Foo_Bar": a lowercase RFC 1123 subdomain"#),
            "{lines:?}"
        );
        let node_port_on_cluster_ip =
            json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30080}]}});
        assert_eq!(
            errors_of(&node_port_on_cluster_ip),
            ["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]
        );
    }

    #[test]
    fn updates_keep_what_was_allocated_and_refuse_a_new_cluster_ip() {
        let old = json!({"spec": {"type": "NodePort", "clusterIP": "10.43.0.5", "clusterIPs": ["10.43.0.5"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}});
        let mut new = json!({"spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80}]}});
        ServiceStrategy.default(&mut new);
        ServiceStrategy.prepare_for_update(&mut new, &old);
        assert_eq!(new["spec"]["clusterIPs"], json!(["10.43.0.5"]));
        assert_eq!(new["spec"]["ports"][0]["nodePort"], 30080);
        assert_eq!(new["spec"]["ipFamilyPolicy"], "SingleStack");
        let mut changed = new.clone();
        changed["spec"]["clusterIP"] = json!("10.43.0.9");
        ServiceStrategy.prepare_for_update(&mut changed, &old);
        let mut errs = Vec::new();
        ServiceStrategy.validate_update(&changed, &old, &mut errs);
        let lines: Vec<String> = errs.iter().map(FieldError::to_line).collect();
        assert_eq!(lines, [r#"spec.clusterIPs[0]: Invalid value: ["10.43.0.9"]: may not change once set"#]);
    }

    #[test]
    fn a_type_change_drops_what_no_longer_applies() {
        let old = json!({"spec": {"type": "NodePort", "clusterIP": "10.43.0.5", "clusterIPs": ["10.43.0.5"],
            "externalTrafficPolicy": "Cluster", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}});
        let mut to_cluster_ip = old.clone();
        to_cluster_ip["spec"]["type"] = json!("ClusterIP");
        ServiceStrategy.prepare_for_update(&mut to_cluster_ip, &old);
        assert!(to_cluster_ip["spec"]["ports"][0].get("nodePort").is_none(), "{to_cluster_ip}");
        assert!(to_cluster_ip["spec"].get("externalTrafficPolicy").is_none());
        assert_eq!(to_cluster_ip["spec"]["clusterIP"], "10.43.0.5");
        let mut to_external = old.clone();
        to_external["spec"]["type"] = json!("ExternalName");
        to_external["spec"]["externalName"] = json!("example.com");
        ServiceStrategy.prepare_for_update(&mut to_external, &old);
        assert!(to_external["spec"].get("clusterIP").is_none() && to_external["spec"].get("clusterIPs").is_none());
    }

    #[test]
    fn client_ip_affinity_gets_upstreams_default_timeout() {
        let mut svc = json!({"spec": {"sessionAffinity": "ClientIP", "ports": [{"port": 80}]}});
        ServiceStrategy.default(&mut svc);
        assert_eq!(svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"], 10800);
        let mut lb = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        ServiceStrategy.default(&mut lb);
        assert_eq!(
            (lb["spec"]["allocateLoadBalancerNodePorts"].clone(), lb["spec"]["externalTrafficPolicy"].clone()),
            (json!(true), json!("Cluster"))
        );
    }

    #[test]
    fn service_defaults_and_port_validation() {
        let mut svc = json!({"spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
        ServiceStrategy.default(&mut svc);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        let mut errs = Vec::new();
        ServiceStrategy.validate(&svc, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        let bad = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 0}, {"port": 81}]}});
        ServiceStrategy.validate(&bad, &mut errs);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.ports[0].port", "spec.ports[0].name", "spec.ports[1].name"]);
    }
}
