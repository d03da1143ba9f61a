//! Encryption at rest, as upstream's `--encryption-provider-config`: an
//! EncryptionConfiguration (apiserver.config.k8s.io/v1) names, per resource, providers
//! in order; the first writes, all of them read. Providers: `aescbc`, `aesgcm`,
//! `secretbox` (each with named keys) and `identity` (plain). Stored values carry
//! upstream's prefix `k8s:enc:<provider>:v1:<key name>:` before the ciphertext, so a
//! value says which key it needs.
//!
//! [`EncryptedStore`] wraps the store: values of the configured resources are encrypted
//! on their way in and decrypted on their way out (gets, lists, watch events), so the
//! watch cache and everything above it see plain objects. A value no configured key can
//! read is a storage error naming the key it wants, so a server started with a wrong or
//! missing key fails at start (the cache's first load) with that message instead of
//! serving objects it cannot read.
//!
//! Rotation: when the configuration file changes (checked every two seconds), the new
//! one is loaded and every value not written by the new first key is rewritten with it
//! (a compare-and-swap per key, so concurrent writes win). `krate secrets-encrypt
//! rotate` writes such a file with a new key first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use krate_store::{Event, KeyValue, ListRequest, ListResponse, Revision, Store, StoreError, WatchBatch, WatchStream};
use serde::{Deserialize, Serialize};

const PREFIX: &[u8] = b"k8s:enc:";

/// One key of a provider.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Key {
    pub name: String,
    /// Base64 of the key bytes.
    pub secret: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Keys {
    pub keys: Vec<Key>,
}

/// One provider entry (exactly one field set).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aescbc: Option<Keys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aesgcm: Option<Keys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secretbox: Option<Keys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<serde_json::Value>,
    /// Not supported by krate; refused with a clear message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourceConfig {
    pub resources: Vec<String>,
    pub providers: Vec<ProviderConfig>,
}

/// The file's contents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionConfiguration {
    pub api_version: String,
    pub kind: String,
    pub resources: Vec<ResourceConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cipher {
    AesCbc,
    AesGcm,
    Secretbox,
}

impl Cipher {
    fn name(self) -> &'static str {
        match self {
            Cipher::AesCbc => "aescbc",
            Cipher::AesGcm => "aesgcm",
            Cipher::Secretbox => "secretbox",
        }
    }
}

/// A provider ready to use: a cipher with one key, or plain text.
#[derive(Clone)]
enum Provider {
    Keyed { cipher: Cipher, name: String, key: Vec<u8> },
    Identity,
}

impl Provider {
    fn label(&self) -> String {
        match self {
            Provider::Keyed { cipher, name, .. } => format!("{}:{name}", cipher.name()),
            Provider::Identity => "identity".into(),
        }
    }
}

/// The providers of one group of resources, the writing one first.
struct Rule {
    /// `secrets`, `deployments.apps`, `*.apps`, `*.*`.
    resources: Vec<String>,
    providers: Vec<Provider>,
}

/// A loaded configuration (its Debug form shows no key).
pub struct Config {
    rules: Vec<Rule>,
    /// The file's text, to notice changes.
    text: String,
}

fn decode_key(cipher: Cipher, key: &Key) -> anyhow::Result<Vec<u8>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.secret.trim())
        .map_err(|e| anyhow::anyhow!("key {:?} of {} is not base64: {e}", key.name, cipher.name()))?;
    let ok = match cipher {
        Cipher::AesCbc | Cipher::AesGcm => matches!(bytes.len(), 16 | 24 | 32),
        Cipher::Secretbox => bytes.len() == 32,
    };
    if !ok {
        let want = if cipher == Cipher::Secretbox { "32" } else { "16, 24 or 32" };
        anyhow::bail!("key {:?} of {} has {} bytes; it must have {want}", key.name, cipher.name(), bytes.len());
    }
    Ok(bytes)
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let providers: Vec<Vec<String>> =
            self.rules.iter().map(|r| r.providers.iter().map(Provider::label).collect()).collect();
        f.debug_struct("Config").field("providers", &providers).finish()
    }
}

impl Config {
    /// Parses and checks an EncryptionConfiguration (YAML or JSON).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: EncryptionConfiguration =
            serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("not an EncryptionConfiguration: {e}"))?;
        if file.kind != "EncryptionConfiguration" || file.api_version != "apiserver.config.k8s.io/v1" {
            anyhow::bail!(
                "expected kind EncryptionConfiguration of apiserver.config.k8s.io/v1, found {} of {}",
                file.kind,
                file.api_version
            );
        }
        let mut rules = Vec::new();
        for (i, resource) in file.resources.iter().enumerate() {
            let mut providers = Vec::new();
            for p in &resource.providers {
                let keyed =
                    [(Cipher::AesCbc, &p.aescbc), (Cipher::AesGcm, &p.aesgcm), (Cipher::Secretbox, &p.secretbox)];
                let set = keyed.iter().filter(|(_, k)| k.is_some()).count()
                    + usize::from(p.identity.is_some())
                    + usize::from(p.kms.is_some());
                if set != 1 {
                    anyhow::bail!(
                        "resources[{i}]: each provider names exactly one of aescbc, aesgcm, secretbox, identity"
                    );
                }
                if p.kms.is_some() {
                    anyhow::bail!(
                        "resources[{i}]: the kms provider is not supported by krate (use aescbc, aesgcm or secretbox)"
                    );
                }
                if p.identity.is_some() {
                    providers.push(Provider::Identity);
                }
                for (cipher, keys) in keyed {
                    let Some(keys) = keys else { continue };
                    if keys.keys.is_empty() {
                        anyhow::bail!("resources[{i}]: {} needs at least one key", cipher.name());
                    }
                    for key in &keys.keys {
                        if key.name.is_empty() || key.name.contains(':') {
                            anyhow::bail!("resources[{i}]: key names must be non-empty and contain no ':'");
                        }
                        providers.push(Provider::Keyed {
                            cipher,
                            name: key.name.clone(),
                            key: decode_key(cipher, key)?,
                        });
                    }
                }
            }
            if providers.is_empty() {
                anyhow::bail!("resources[{i}] has no providers");
            }
            rules.push(Rule { resources: resource.resources.clone(), providers });
        }
        Ok(Self { rules, text: text.to_string() })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The providers for a store key (`/registry/{group|core}/{resource}/...`).
    fn providers(&self, key: &str) -> Option<&[Provider]> {
        let mut parts = key.strip_prefix(crate::cache::REGISTRY_PREFIX)?.splitn(3, '/');
        let (group, resource) = (parts.next()?, parts.next()?);
        let group = if group == "core" { "" } else { group };
        self.rules
            .iter()
            .find(|rule| {
                rule.resources.iter().any(|r| {
                    let (res, grp) = r.split_once('.').unwrap_or((r.as_str(), ""));
                    (res == "*" || res == resource) && (grp == "*" || grp == group)
                })
            })
            .map(|rule| rule.providers.as_slice())
    }

    /// The store prefixes of the configured resources (the whole registry when a rule
    /// names resources by wildcard).
    fn stored_prefixes(&self) -> Vec<String> {
        let mut prefixes = std::collections::BTreeSet::new();
        for resource in self.rules.iter().flat_map(|r| &r.resources) {
            if resource.contains('*') {
                return vec![crate::cache::REGISTRY_PREFIX.to_string()];
            }
            let (res, group) = resource.split_once('.').unwrap_or((resource.as_str(), ""));
            let group = if group.is_empty() { "core" } else { group };
            prefixes.insert(format!("{}{group}/{res}/", crate::cache::REGISTRY_PREFIX));
        }
        prefixes.into_iter().collect()
    }

    /// The provider writing the resource of `key` (as `aescbc:key1`), if not identity.
    pub fn writer(&self, key: &str) -> Option<String> {
        self.providers(key).and_then(|p| p.first()).filter(|p| !matches!(p, Provider::Identity)).map(Provider::label)
    }

    fn encrypt(&self, key: &str, value: &[u8]) -> Result<Bytes, StoreError> {
        match self.providers(key).and_then(|p| p.first()) {
            None | Some(Provider::Identity) => Ok(Bytes::copy_from_slice(value)),
            Some(Provider::Keyed { cipher, name, key: secret }) => {
                let mut out = format!("k8s:enc:{}:v1:{name}:", cipher.name()).into_bytes();
                out.extend(seal(*cipher, secret, key.as_bytes(), value)?);
                Ok(Bytes::from(out))
            }
        }
    }

    /// Plain bytes of a stored value, and whether it was written by the writing
    /// provider (false: it should be rewritten).
    fn decrypt(&self, key: &str, value: &Bytes) -> Result<(Bytes, bool), StoreError> {
        let Some(providers) = self.providers(key) else { return Ok((value.clone(), true)) };
        let first = providers.first().map(Provider::label);
        let Some(rest) = value.strip_prefix(PREFIX) else {
            if providers.iter().any(|p| matches!(p, Provider::Identity)) {
                return Ok((value.clone(), first.as_deref() == Some("identity")));
            }
            return Err(StoreError::Backend(format!(
                "{key} is stored unencrypted, and the encryption configuration has no identity provider to read it"
            )));
        };
        let text = String::from_utf8_lossy(&rest[..rest.len().min(200)]).into_owned();
        let mut fields = text.splitn(4, ':');
        let (cipher, version, name) =
            (fields.next().unwrap_or(""), fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        let header = cipher.len() + version.len() + name.len() + 3;
        let found = providers
            .iter()
            .find(|p| matches!(p, Provider::Keyed { cipher: c, name: n, .. } if c.name() == cipher && n == name));
        let Some(Provider::Keyed { cipher: c, key: secret, .. }) = found else {
            return Err(StoreError::Backend(format!(
                "{key} is encrypted with {cipher} key {name:?}, which the encryption configuration does not have (was the key removed, or is this the wrong configuration?)"
            )));
        };
        if version != "v1" || rest.len() < header {
            return Err(StoreError::Backend(format!("{key}: unknown encrypted value format {cipher}:{version}")));
        }
        let plain = open(*c, secret, key.as_bytes(), &rest[header..]).map_err(|e| {
            StoreError::Backend(format!("{key}: decrypting with {cipher} key {name:?} failed ({e}); the key's secret differs from the one that wrote it"))
        })?;
        let current = first.as_deref() == Some(&format!("{cipher}:{name}")[..]);
        Ok((Bytes::from(plain), current))
    }
}

fn seal(cipher: Cipher, secret: &[u8], context: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let failed = |e: &dyn std::fmt::Display| StoreError::Backend(format!("encrypting: {e}"));
    match cipher {
        Cipher::AesCbc => {
            use cbc::cipher::{BlockEncryptMut, KeyIvInit};
            let iv: [u8; 16] = rand::random();
            let sealed = match secret.len() {
                16 => cbc::Encryptor::<aes::Aes128>::new(secret.into(), &iv.into())
                    .encrypt_padded_vec_mut::<cbc::cipher::block_padding::Pkcs7>(plain),
                24 => cbc::Encryptor::<aes::Aes192>::new(secret.into(), &iv.into())
                    .encrypt_padded_vec_mut::<cbc::cipher::block_padding::Pkcs7>(plain),
                _ => cbc::Encryptor::<aes::Aes256>::new(secret.into(), &iv.into())
                    .encrypt_padded_vec_mut::<cbc::cipher::block_padding::Pkcs7>(plain),
            };
            Ok([&iv[..], &sealed].concat())
        }
        Cipher::AesGcm => {
            let nonce: [u8; 12] = rand::random();
            let payload = Payload { msg: plain, aad: context };
            let sealed = match secret.len() {
                16 => aes_gcm::Aes128Gcm::new(secret.into()).encrypt(&nonce.into(), payload),
                24 => aes_gcm::AesGcm::<aes::Aes192, aes_gcm::aead::consts::U12>::new(secret.into())
                    .encrypt(&nonce.into(), payload),
                _ => aes_gcm::Aes256Gcm::new(secret.into()).encrypt(&nonce.into(), payload),
            }
            .map_err(|e| failed(&e))?;
            Ok([&nonce[..], &sealed].concat())
        }
        Cipher::Secretbox => {
            let nonce: [u8; 24] = rand::random();
            let sealed = crypto_secretbox::XSalsa20Poly1305::new(secret.into())
                .encrypt(&nonce.into(), plain)
                .map_err(|e| failed(&e))?;
            Ok([&nonce[..], &sealed].concat())
        }
    }
}

fn open(cipher: Cipher, secret: &[u8], context: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let short = || "the value is too short".to_string();
    match cipher {
        Cipher::AesCbc => {
            use cbc::cipher::{BlockDecryptMut, KeyIvInit};
            if data.len() < 32 || !data.len().is_multiple_of(16) {
                return Err(short());
            }
            let (iv, body) = data.split_at(16);
            let pad = |e: cbc::cipher::block_padding::UnpadError| e.to_string();
            match secret.len() {
                16 => cbc::Decryptor::<aes::Aes128>::new(secret.into(), iv.into())
                    .decrypt_padded_vec_mut::<cbc::cipher::block_padding::Pkcs7>(body)
                    .map_err(pad),
                24 => cbc::Decryptor::<aes::Aes192>::new(secret.into(), iv.into())
                    .decrypt_padded_vec_mut::<cbc::cipher::block_padding::Pkcs7>(body)
                    .map_err(pad),
                _ => cbc::Decryptor::<aes::Aes256>::new(secret.into(), iv.into())
                    .decrypt_padded_vec_mut::<cbc::cipher::block_padding::Pkcs7>(body)
                    .map_err(pad),
            }
        }
        Cipher::AesGcm => {
            if data.len() < 12 + 16 {
                return Err(short());
            }
            let (nonce, body) = data.split_at(12);
            let payload = Payload { msg: body, aad: context };
            match secret.len() {
                16 => aes_gcm::Aes128Gcm::new(secret.into()).decrypt(nonce.into(), payload),
                24 => aes_gcm::AesGcm::<aes::Aes192, aes_gcm::aead::consts::U12>::new(secret.into())
                    .decrypt(nonce.into(), payload),
                _ => aes_gcm::Aes256Gcm::new(secret.into()).decrypt(nonce.into(), payload),
            }
            .map_err(|e| e.to_string())
        }
        Cipher::Secretbox => {
            if data.len() < 24 + 16 {
                return Err(short());
            }
            let (nonce, body) = data.split_at(24);
            crypto_secretbox::XSalsa20Poly1305::new(secret.into())
                .decrypt(nonce.into(), body)
                .map_err(|e| e.to_string())
        }
    }
}

/// The SHA-256 (hex) of a configuration file's text, which the status file names.
pub fn fingerprint(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh configuration: Secrets under a new AES-CBC key, unencrypted values still
/// readable (as k3s's default).
pub fn generated_config() -> String {
    let secret = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let name = key_name();
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources:\n  - secrets\n  providers:\n  - aescbc:\n      keys:\n      - name: {name}\n        secret: {secret}\n  - identity: {{}}\n"
    )
}

/// A key name that sorts by creation time.
fn key_name() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("key-{}", now.as_secs())
}

/// `text` with a new key first in every aescbc/aesgcm/secretbox provider that writes,
/// keeping the key that wrote until now (for values not yet rewritten) and dropping
/// older ones.
pub fn rotated_config(text: &str) -> anyhow::Result<String> {
    Config::parse(text)?;
    let mut file: EncryptionConfiguration = serde_yaml::from_str(text)?;
    let mut rotated = 0;
    for resource in &mut file.resources {
        let Some(first) = resource.providers.first_mut() else { continue };
        for keys in [&mut first.aescbc, &mut first.aesgcm, &mut first.secretbox].into_iter().flatten() {
            let secret = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
            let mut name = key_name();
            while keys.keys.iter().any(|k| k.name == name) {
                name.push('x');
            }
            keys.keys.truncate(1);
            keys.keys.insert(0, Key { name, secret });
            rotated += 1;
        }
    }
    if rotated == 0 {
        anyhow::bail!("no resource is written by aescbc, aesgcm or secretbox; there is no key to rotate");
    }
    Ok(serde_yaml::to_string(&file)?)
}

/// The store wrapper; see the module documentation.
pub struct EncryptedStore {
    inner: Arc<dyn Store>,
    config: Arc<RwLock<Arc<Config>>>,
    path: PathBuf,
}

/// `kv` with its value decrypted.
fn plain(config: &Config, mut kv: KeyValue) -> Result<KeyValue, StoreError> {
    kv.value = config.decrypt(&kv.key, &kv.value)?.0;
    Ok(kv)
}

impl EncryptedStore {
    /// Loads `path` and wraps `inner`.
    pub fn open(inner: Arc<dyn Store>, path: &Path) -> anyhow::Result<Arc<Self>> {
        let config = Config::load(path)?;
        Ok(Arc::new(Self { inner, config: Arc::new(RwLock::new(Arc::new(config))), path: path.to_path_buf() }))
    }

    fn config(&self) -> Arc<Config> {
        self.config.read().expect("encryption config lock").clone()
    }

    /// The writing provider of Secrets (`aescbc:key-...`), for status reports.
    pub fn secrets_writer(&self) -> String {
        self.config().writer("/registry/core/secrets/").unwrap_or_else(|| "identity".into())
    }

    /// Reloads the file when it changed, then rewrites what the new writing key did not
    /// write; every two seconds until the task is dropped.
    pub fn watch_config(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let Ok(text) = std::fs::read_to_string(&self.path) else { continue };
                if text == self.config().text {
                    continue;
                }
                match Config::parse(&text) {
                    Ok(config) => {
                        *self.config.write().expect("encryption config lock") = Arc::new(config);
                        tracing::info!(path = %self.path.display(), writer = %self.secrets_writer(), "encryption configuration reloaded");
                        match self.rewrite_stale().await {
                            Ok(n) => {
                                tracing::info!(rewritten = n, "values re-encrypted with the new key");
                                self.write_status(n);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "re-encrypting stored values failed; it is retried when the configuration next changes")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), error = %format!("{e:#}"), "the changed encryption configuration is refused; the previous one stays in use")
                    }
                }
            }
        });
    }

    /// Where the server reports the key its last rewrite pass left every value under
    /// (`<config>.status`, JSON), for `krate secrets-encrypt`.
    pub fn status_path(config: &Path) -> PathBuf {
        let mut name = config.file_name().unwrap_or_default().to_os_string();
        name.push(".status");
        config.with_file_name(name)
    }

    /// Records that every value is now under the current writing key, and for which
    /// configuration (by its fingerprint: the file holds the keys, the status must not).
    pub fn write_status(&self, rewritten: usize) {
        let status = serde_json::json!({"writer": self.secrets_writer(), "rewritten": rewritten,
            "configSha256": fingerprint(&self.config().text)});
        if let Err(e) = std::fs::write(Self::status_path(&self.path), status.to_string()) {
            tracing::warn!(error = %e, "cannot write the encryption status file");
        }
    }

    /// Rewrites every value of the configured resources that the writing provider did
    /// not write; returns how many.
    pub async fn rewrite_stale(&self) -> Result<usize, StoreError> {
        let config = self.config();
        let mut rewritten = 0;
        let mut items = Vec::new();
        for prefix in config.stored_prefixes() {
            items.extend(self.inner.list(ListRequest { prefix, ..Default::default() }).await?.items);
        }
        for kv in items {
            if config.providers(&kv.key).is_none() {
                continue;
            }
            let mut current = kv;
            loop {
                let (plain, up_to_date) = config.decrypt(&current.key, &current.value)?;
                if up_to_date {
                    break;
                }
                let sealed = config.encrypt(&current.key, &plain)?;
                match self.inner.update(&current.key, sealed, current.mod_revision).await {
                    Ok(_) => {
                        rewritten += 1;
                        break;
                    }
                    Err(StoreError::Conflict { .. }) => match self.inner.get(&current.key).await? {
                        Some(newer) => current = newer,
                        None => break,
                    },
                    Err(StoreError::NotFound(_)) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(rewritten)
    }
}

#[async_trait]
impl Store for EncryptedStore {
    async fn get(&self, key: &str) -> krate_store::Result<Option<KeyValue>> {
        let config = self.config();
        self.inner.get(key).await?.map(|kv| plain(&config, kv)).transpose()
    }

    async fn list(&self, request: ListRequest) -> krate_store::Result<ListResponse> {
        let config = self.config();
        let mut response = self.inner.list(request).await?;
        response.items = response.items.into_iter().map(|kv| plain(&config, kv)).collect::<Result<_, _>>()?;
        Ok(response)
    }

    async fn create(&self, key: &str, value: Bytes) -> krate_store::Result<KeyValue> {
        let sealed = self.config().encrypt(key, &value)?;
        let mut kv = self.inner.create(key, sealed).await?;
        kv.value = value;
        Ok(kv)
    }

    async fn update(&self, key: &str, value: Bytes, expected_revision: Revision) -> krate_store::Result<KeyValue> {
        let sealed = self.config().encrypt(key, &value)?;
        let mut kv = self.inner.update(key, sealed, expected_revision).await?;
        kv.value = value;
        Ok(kv)
    }

    async fn delete(
        &self,
        key: &str,
        expected_revision: Option<Revision>,
    ) -> krate_store::Result<(Revision, KeyValue)> {
        let (revision, prev) = self.inner.delete(key, expected_revision).await?;
        Ok((revision, plain(&self.config(), prev)?))
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> WatchStream {
        // Events are decrypted with the configuration of the moment they arrive.
        let config = self.config.clone();
        Box::pin(self.inner.watch(prefix, from_revision).map(move |batch| {
            let config = config.read().expect("encryption config lock").clone();
            let batch = batch?;
            let events = batch
                .events
                .into_iter()
                .map(|event| match event {
                    Event::Put(kv) => plain(&config, kv).map(Event::Put),
                    Event::Delete { revision, prev } => {
                        plain(&config, prev).map(|prev| Event::Delete { revision, prev })
                    }
                })
                .collect::<krate_store::Result<_>>()?;
            Ok(WatchBatch { events, revision: batch.revision })
        }))
    }

    async fn compact(&self, revision: Revision) -> krate_store::Result<()> {
        self.inner.compact(revision).await
    }

    async fn current_revision(&self) -> krate_store::Result<Revision> {
        self.inner.current_revision().await
    }

    async fn compacted_revision(&self) -> krate_store::Result<Revision> {
        self.inner.compacted_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(provider: &str, secret: &[u8]) -> String {
        let secret = base64::engine::general_purpose::STANDARD.encode(secret);
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - {provider}:\n      keys:\n      - name: k1\n        secret: {secret}\n"
        )
    }

    const KEY: &str = "/registry/core/secrets/default/s";

    #[test]
    fn every_provider_and_key_size_round_trips() {
        for (provider, sizes) in
            [("aescbc", &[16, 24, 32][..]), ("aesgcm", &[16, 24, 32][..]), ("secretbox", &[32][..])]
        {
            for &size in sizes {
                let config = Config::parse(&config(provider, &vec![7u8; size])).unwrap();
                let plain = br#"{"data":{"password":"hunter2"}}"#;
                let sealed = config.encrypt(KEY, plain).unwrap();
                assert!(sealed.starts_with(format!("k8s:enc:{provider}:v1:k1:").as_bytes()), "{provider}");
                assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "{provider} {size}: no plain text");
                let (back, current) = config.decrypt(KEY, &sealed).unwrap();
                assert_eq!((&back[..], current), (&plain[..], true), "{provider} {size}");
            }
        }
    }

    #[test]
    fn other_resources_and_plain_values_pass_through() {
        let config = Config::parse(&config("aescbc", &[1; 32])).unwrap();
        let cm = "/registry/core/configmaps/default/c";
        assert_eq!(&config.encrypt(cm, b"{}").unwrap()[..], b"{}");
        let err = config.decrypt(KEY, &Bytes::from_static(b"{}")).unwrap_err();
        assert!(err.to_string().contains("no identity provider"), "{err}");
    }

    #[test]
    fn a_wrong_or_missing_key_is_named() {
        let writer = Config::parse(&config("aesgcm", &[1; 32])).unwrap();
        let sealed = writer.encrypt(KEY, b"{}").unwrap();
        let other_secret = Config::parse(&config("aesgcm", &[2; 32])).unwrap();
        let err = other_secret.decrypt(KEY, &sealed).unwrap_err().to_string();
        assert!(err.contains("the key's secret differs"), "{err}");
        let other_name = Config::parse(&config("aesgcm", &[1; 32]).replace("k1", "k2")).unwrap();
        let err = other_name.decrypt(KEY, &sealed).unwrap_err().to_string();
        assert!(err.contains(r#"aesgcm key "k1", which the encryption configuration does not have"#), "{err}");
        // A value moved to another key is refused (aesgcm binds the store key).
        let err = writer.decrypt("/registry/core/secrets/default/t", &sealed).unwrap_err().to_string();
        assert!(err.contains("decrypting"), "{err}");
    }

    #[test]
    fn rewrites_read_only_the_configured_resources() {
        assert_eq!(Config::parse(&config("aescbc", &[1; 32])).unwrap().stored_prefixes(), ["/registry/core/secrets/"]);
        let wide = config("aescbc", &[1; 32]).replace("[secrets]", "[secrets, deployments.apps, \"*.batch\"]");
        assert_eq!(Config::parse(&wide).unwrap().stored_prefixes(), ["/registry/"]);
    }

    #[test]
    fn bad_files_are_refused_with_reasons() {
        assert!(Config::parse(&config("aescbc", &[1; 5])).unwrap_err().to_string().contains("has 5 bytes"));
        assert!(Config::parse(&config("secretbox", &[1; 16])).unwrap_err().to_string().contains("it must have 32"));
        assert!(Config::parse("kind: Pod\napiVersion: v1\nresources: []\n").is_err());
    }

    #[test]
    fn rotation_puts_a_new_key_first_and_keeps_the_previous_one() {
        let generated = generated_config();
        let before = Config::parse(&generated).unwrap();
        let sealed = before.encrypt(KEY, b"{}").unwrap();
        let rotated = rotated_config(&generated).unwrap();
        let after = Config::parse(&rotated).unwrap();
        assert_ne!(before.writer(KEY), after.writer(KEY));
        let (plain, current) = after.decrypt(KEY, &sealed).unwrap();
        assert_eq!((&plain[..], current), (&b"{}"[..], false), "old values stay readable and are marked stale");
        let twice = Config::parse(&rotated_config(&rotated).unwrap()).unwrap();
        assert!(twice.decrypt(KEY, &sealed).is_err(), "keys older than the previous one are dropped");
    }

    #[tokio::test]
    async fn the_store_keeps_no_plain_secret_and_rewrites_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Store> = Arc::new(krate_store::sqlite::SqliteStore::open(dir.path().join("db")).unwrap());
        let path = dir.path().join("encryption.yaml");
        std::fs::write(&path, generated_config()).unwrap();
        let store = EncryptedStore::open(raw.clone(), &path).unwrap();
        store.create(KEY, Bytes::from_static(b"{\"v\":\"hunter2\"}")).await.unwrap();
        let stored = raw.get(KEY).await.unwrap().unwrap();
        assert!(stored.value.starts_with(b"k8s:enc:aescbc:v1:"));
        assert_eq!(&store.get(KEY).await.unwrap().unwrap().value[..], b"{\"v\":\"hunter2\"}");
        let first_key = store.secrets_writer();
        std::fs::write(&path, rotated_config(&std::fs::read_to_string(&path).unwrap()).unwrap()).unwrap();
        *store.config.write().unwrap() = Arc::new(Config::load(&path).unwrap());
        assert_eq!(store.rewrite_stale().await.unwrap(), 1);
        let second = raw.get(KEY).await.unwrap().unwrap();
        assert!(!second.value.starts_with(format!("k8s:enc:{}:", first_key.replace(':', ":v1:")).as_bytes()));
        assert_eq!(store.rewrite_stale().await.unwrap(), 0, "nothing stale is left");
        assert_eq!(&store.get(KEY).await.unwrap().unwrap().value[..], b"{\"v\":\"hunter2\"}");
    }
}
