//! `krate kubeconfig`: the admin kubeconfig of a data directory, a new one for another
//! user or node, and `--merge`, which adds the cluster to the user's own kubeconfig as a
//! new context without touching anyone else's entries (the seeds: local auth files must
//! not be overwritten when working with several clusters).
//!
//! A merged cluster is named after the server's host (`krate-127.0.0.1`); when another
//! cluster already holds that name, a number is added (`krate-127.0.0.1-2`). Merging the
//! same cluster again (same server and CA) refreshes its entries in place.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Prints the admin kubeconfig, or a new one for `user` (or the node agent of `node`);
/// with `merge`, adds it to the user's kubeconfig instead.
pub fn run(
    data_dir: &Path,
    user: Option<String>,
    groups: Vec<String>,
    node: Option<String>,
    merge: bool,
) -> anyhow::Result<()> {
    let admin = std::fs::read_to_string(data_dir.join("admin.kubeconfig")).map_err(|e| {
        anyhow::anyhow!(
            "reading {}/admin.kubeconfig: {e}; has `krate server --data-dir {}` run yet?",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    let config = match (user, node) {
        (None, None) => admin,
        (user, node) => {
            let (user, groups) = match (user, node) {
                (Some(user), _) => (user, groups),
                (None, Some(node)) => (format!("system:node:{node}"), vec!["system:nodes".to_string()]),
                (None, None) => unreachable!(),
            };
            let config: Value = serde_yaml::from_str(&admin)?;
            let server =
                config["clusters"][0]["cluster"]["server"].as_str().unwrap_or("https://127.0.0.1:6443").to_string();
            let pki = crate::pki::Pki::load_or_create(&data_dir.join("pki"))?;
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            pki.user_kubeconfig(&server, &user, &groups)?
        }
    };
    if !merge {
        print!("{config}");
        return Ok(());
    }
    let target = user_kubeconfig_path()?;
    let existing =
        match std::fs::read_to_string(&target) {
            Ok(text) if !text.trim().is_empty() => Some(serde_yaml::from_str::<Value>(&text).with_context(|| {
                format!("{} is not a kubeconfig; fix or move it, then merge again", target.display())
            })?),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", target.display()))),
        };
    let first = existing.is_none();
    let (merged, outcome) = merge_into(existing, &serde_yaml::from_str(&config)?)?;
    write_private(&target, &serde_yaml::to_string(&merged)?)?;
    let name = outcome.name();
    match outcome {
        Merged::Added(_) => println!("added context {name:?} to {}", target.display()),
        Merged::Refreshed(_) => println!("refreshed context {name:?} in {}", target.display()),
    }
    if first {
        println!("it is the current context");
    } else if merged["current-context"] != name {
        println!("switch to it with: kubectl config use-context {name}");
    }
    Ok(())
}

/// The file kubectl writes to: the first path of `$KUBECONFIG`, else `~/.kube/config`.
fn user_kubeconfig_path() -> anyhow::Result<PathBuf> {
    if let Some(first) = std::env::var_os("KUBECONFIG").and_then(|v| std::env::split_paths(&v).next()) {
        if !first.as_os_str().is_empty() {
            return Ok(first);
        }
    }
    let home = std::env::var_os("HOME").context("neither KUBECONFIG nor HOME is set; set KUBECONFIG to a file")?;
    Ok(PathBuf::from(home).join(".kube/config"))
}

/// Writes `text` to `path` through a temporary file (a reader never sees half a
/// kubeconfig), readable by its owner only, as kubectl does.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    krate_client::csr::write_private(path, text)
}

/// What merging did, with the name of the cluster, user and context.
#[derive(Debug, PartialEq)]
enum Merged {
    Added(String),
    Refreshed(String),
}

impl Merged {
    fn name(&self) -> &str {
        match self {
            Merged::Added(name) | Merged::Refreshed(name) => name,
        }
    }
}

/// Adds the one cluster, user and context of `new` to `existing` under one free name.
fn merge_into(existing: Option<Value>, new: &Value) -> anyhow::Result<(Value, Merged)> {
    let cluster = new["clusters"][0]["cluster"].clone();
    let user = new["users"][0]["user"].clone();
    let Some(server) = cluster["server"].as_str() else { bail!("the kubeconfig to merge names no server") };
    let mut config = existing.unwrap_or_else(|| {
        json!({"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": [],
               "current-context": "", "preferences": {}})
    });
    if !config.is_object() {
        bail!("the existing kubeconfig is not a YAML mapping; fix or move it, then merge again");
    }
    for list in ["clusters", "users", "contexts"] {
        if config[list].is_null() {
            config[list] = json!([]);
        }
        if !config[list].is_array() {
            bail!("the existing kubeconfig's {list:?} is not a list; fix it, then merge again");
        }
    }
    let host = server.trim_start_matches("https://").rsplit_once(':').map_or(server, |(host, _)| host);
    let base = format!("krate-{}", host.trim_start_matches('[').trim_end_matches(']'));
    let named = |config: &Value, list: &str, name: &str| {
        config[list].as_array().into_iter().flatten().any(|entry| entry["name"] == name)
    };
    // The same cluster merged before: same server and CA under a name of ours.
    let same = |config: &Value, name: &str| {
        config["clusters"].as_array().into_iter().flatten().any(|entry| {
            entry["name"] == name
                && entry["cluster"]["server"] == cluster["server"]
                && entry["cluster"]["certificate-authority-data"] == cluster["certificate-authority-data"]
        })
    };
    let mut chosen = None;
    for n in 1.. {
        let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
        if same(&config, &name) {
            chosen = Some(Merged::Refreshed(name));
            break;
        }
        if !["clusters", "users", "contexts"].iter().any(|list| named(&config, list, &name)) {
            chosen = Some(Merged::Added(name));
            break;
        }
    }
    let outcome = chosen.expect("a free name");
    let name = outcome.name().to_string();
    let entries = [
        ("clusters", json!({"name": name, "cluster": cluster})),
        ("users", json!({"name": name, "user": user})),
        ("contexts", json!({"name": name, "context": {"cluster": name, "user": name}})),
    ];
    for (list, entry) in entries {
        let items = config[list].as_array_mut().expect("checked above");
        match items.iter_mut().find(|e| e["name"] == name.as_str()) {
            Some(slot) => *slot = entry,
            None => items.push(entry),
        }
    }
    if config["current-context"].as_str().unwrap_or_default().is_empty() {
        config["current-context"] = json!(name);
    }
    Ok((config, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(server: &str, ca: &str, cert: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Config",
               "clusters": [{"name": "krate", "cluster": {"server": server, "certificate-authority-data": ca}}],
               "users": [{"name": "krate-admin", "user": {"client-certificate-data": cert}}],
               "contexts": [{"name": "krate", "context": {"cluster": "krate", "user": "krate-admin"}}],
               "current-context": "krate"})
    }

    #[test]
    fn a_first_merge_creates_the_file_and_makes_it_current() {
        let (config, outcome) = merge_into(None, &cluster("https://127.0.0.1:6443", "CA", "C")).unwrap();
        assert_eq!(outcome, Merged::Added("krate-127.0.0.1".into()));
        assert_eq!(config["current-context"], "krate-127.0.0.1");
        assert_eq!(config["contexts"][0]["context"], json!({"cluster": "krate-127.0.0.1", "user": "krate-127.0.0.1"}));
        assert_eq!(config["users"][0]["user"]["client-certificate-data"], "C");
    }

    #[test]
    fn another_clusters_entries_are_kept_and_a_taken_name_gets_a_number() {
        let mut theirs = cluster("https://10.0.0.1:6443", "OTHER", "X");
        theirs["clusters"][0]["name"] = json!("krate-127.0.0.1");
        theirs["current-context"] = json!("krate");
        let before = theirs.clone();
        let (config, outcome) = merge_into(Some(theirs), &cluster("https://127.0.0.1:6443", "CA", "C")).unwrap();
        assert_eq!(outcome, Merged::Added("krate-127.0.0.1-2".into()));
        assert_eq!(config["current-context"], "krate", "the current context is left alone");
        for list in ["clusters", "users", "contexts"] {
            assert_eq!(config[list][0], before[list][0], "{list}[0] untouched");
            assert_eq!(config[list].as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn merging_the_same_cluster_again_refreshes_its_entries() {
        let (once, _) = merge_into(None, &cluster("https://127.0.0.1:6443", "CA", "OLD")).unwrap();
        let (twice, outcome) = merge_into(Some(once), &cluster("https://127.0.0.1:6443", "CA", "NEW")).unwrap();
        assert_eq!(outcome, Merged::Refreshed("krate-127.0.0.1".into()));
        assert_eq!(twice["users"].as_array().unwrap().len(), 1);
        assert_eq!(twice["users"][0]["user"]["client-certificate-data"], "NEW");
    }

    #[test]
    fn a_file_that_is_not_a_kubeconfig_is_refused() {
        let err = merge_into(Some(json!(["a"])), &cluster("https://127.0.0.1:6443", "CA", "C")).unwrap_err();
        assert!(err.to_string().contains("not a YAML mapping"), "{err}");
        let err =
            merge_into(Some(json!({"clusters": "x"})), &cluster("https://127.0.0.1:6443", "CA", "C")).unwrap_err();
        assert!(err.to_string().contains("\"clusters\" is not a list"), "{err}");
    }
}
