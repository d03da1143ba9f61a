//! Image garbage collection, as upstream's image manager does it: when the image
//! filesystem is fuller than the high threshold, unused images are removed, least
//! recently used first, until it is back under the low threshold. Images younger than
//! the minimum age, images any container (running or exited) was created from, and the
//! sandbox image are never removed. Under disk pressure every such unused image goes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use crate::cri::{api, Cri};
use crate::pressure::FsStats;

/// `--image-gc-high-threshold`, `--image-gc-low-threshold`, `--minimum-image-ttl-duration`.
#[derive(Clone, Copy, Debug)]
pub struct ImageGcPolicy {
    pub high_percent: u8,
    pub low_percent: u8,
    pub min_age: Duration,
}

impl Default for ImageGcPolicy {
    /// Upstream's defaults.
    fn default() -> Self {
        ImageGcPolicy { high_percent: 85, low_percent: 80, min_age: Duration::from_secs(120) }
    }
}

#[derive(Clone, Copy, Debug)]
struct Record {
    first_detected: Instant,
    last_used: Instant,
}

/// An unused image that may be removed.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    pub size: u64,
}

pub struct ImageGc {
    policy: ImageGcPolicy,
    records: HashMap<String, Record>,
}

fn pinned(image: &api::Image) -> bool {
    image.pinned || image.repo_tags.iter().any(|t| t == crate::images::SANDBOX_IMAGE)
}

impl ImageGc {
    pub fn new(policy: ImageGcPolicy) -> Self {
        ImageGc { policy, records: HashMap::new() }
    }

    /// Brings the records up to date with the runtime's images and containers (`now`
    /// marks every image a container uses as used), and returns the unused images old
    /// enough to remove, least recently used first.
    fn detect(&mut self, images: &[api::Image], containers: &[api::Container], now: Instant) -> Vec<Candidate> {
        let in_use: HashSet<&str> = containers
            .iter()
            .flat_map(|c| [c.image.as_ref().map(|i| i.image.as_str()).unwrap_or_default(), c.image_ref.as_str()])
            .filter(|s| !s.is_empty())
            .collect();
        let present: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
        self.records.retain(|id, _| present.contains(id.as_str()));
        let mut candidates = Vec::new();
        for image in images {
            let record = self.records.entry(image.id.clone()).or_insert(Record { first_detected: now, last_used: now });
            let used = in_use.contains(image.id.as_str())
                || image.repo_tags.iter().chain(&image.repo_digests).any(|r| in_use.contains(r.as_str()));
            if used {
                record.last_used = now;
                continue;
            }
            if pinned(image) || now.duration_since(record.first_detected) < self.policy.min_age {
                continue;
            }
            let name =
                image.repo_tags.first().or(image.repo_digests.first()).cloned().unwrap_or_else(|| image.id.clone());
            candidates.push((
                record.last_used,
                record.first_detected,
                Candidate { id: image.id.clone(), name, size: image.size },
            ));
        }
        candidates.sort_by_key(|(used, detected, _)| (*used, *detected));
        candidates.into_iter().map(|(_, _, c)| c).collect()
    }

    async fn candidates(&mut self, cri: &mut Cri) -> Result<Vec<Candidate>> {
        let images = cri.images.list_images(api::ListImagesRequest { filter: None }).await?.into_inner().images;
        let containers = cri.containers(api::ContainerFilter::default()).await?;
        Ok(self.detect(&images, &containers, Instant::now()))
    }

    /// Records which images are in use (the least recently used go first).
    async fn observe(&mut self, cri: &mut Cri) -> Result<()> {
        self.candidates(cri).await.map(|_| ())
    }

    /// Removes unused images, least recently used first, until `bytes` are freed; returns
    /// the bytes freed (as the runtime counts image sizes).
    async fn free(&mut self, cri: &mut Cri, bytes: u64) -> Result<u64> {
        let mut freed = 0;
        for candidate in self.candidates(cri).await? {
            if freed >= bytes {
                break;
            }
            match cri
                .images
                .remove_image(api::RemoveImageRequest {
                    image: Some(api::ImageSpec { image: candidate.id.clone(), ..Default::default() }),
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(image = %candidate.name, id = %candidate.id, size = candidate.size, "removed an unused image");
                    self.records.remove(&candidate.id);
                    freed += candidate.size;
                }
                Err(e) => {
                    tracing::warn!(image = %candidate.name, error = %e.message(), "removing an unused image failed")
                }
            }
        }
        Ok(freed)
    }

    /// Frees space down to the low threshold when the image filesystem is over the high
    /// one. Returns upstream's FreeDiskSpaceFailed message when too little was eligible.
    pub async fn collect(&mut self, cri: &mut Cri, imagefs: FsStats) -> Result<Option<String>> {
        if imagefs.bytes == 0 || imagefs.used_percent() < f64::from(self.policy.high_percent) {
            return self.observe(cri).await.map(|()| None);
        }
        let keep_free = imagefs.bytes / 100 * u64::from(100 - self.policy.low_percent.min(100));
        let wanted = keep_free.saturating_sub(imagefs.bytes_available);
        tracing::info!(
            usage = format!("{:.0}%", imagefs.used_percent()),
            high = self.policy.high_percent,
            low = self.policy.low_percent,
            bytes = wanted,
            "the image filesystem is over the high threshold; removing unused images"
        );
        let freed = self.free(cri, wanted).await?;
        Ok((freed < wanted).then(|| format!("Failed to garbage collect required amount of images. Attempted to free {wanted} bytes, but only found {freed} bytes eligible to free.")))
    }

    /// Removes every unused image old enough (the node is under disk pressure).
    pub async fn remove_all_unused(&mut self, cri: &mut Cri) -> Result<()> {
        self.free(cri, u64::MAX).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, tag: &str, size: u64) -> api::Image {
        api::Image {
            id: id.into(),
            repo_tags: vec![tag.into()],
            repo_digests: vec![format!("{}@sha256:{id}", tag.split(':').next().unwrap())],
            size,
            ..Default::default()
        }
    }

    fn container(image: &str) -> api::Container {
        api::Container {
            image: Some(api::ImageSpec { image: image.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn unused_images_go_least_recently_used_first_and_the_rest_stay() {
        let mut gc =
            ImageGc::new(ImageGcPolicy { high_percent: 80, low_percent: 70, min_age: Duration::from_secs(60) });
        let t0 = Instant::now();
        let images = vec![
            image("a", "r/a:1", 10),
            image("b", "r/b:1", 20),
            image("c", "r/c:1", 30),
            image("p", crate::images::SANDBOX_IMAGE, 1),
        ];
        // a and b are in use at first (one by id, one by tag); c never is.
        assert!(
            gc.detect(&images, &[container("a"), container("r/b:1")], t0).is_empty(),
            "images younger than the minimum age stay"
        );
        gc.detect(&images, &[container("a"), container("r/b:1")], t0 + Duration::from_secs(30));
        let later = t0 + Duration::from_secs(61);
        // b stops being used before a does; c was never used.
        gc.detect(&images, &[container("a")], later);
        let names = |c: Vec<Candidate>| c.into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(gc.detect(&images, &[], later + Duration::from_secs(10))), ["r/c:1", "r/b:1", "r/a:1"]);
        // An image used by any container, exited or not, by digest too, is not a candidate.
        assert_eq!(
            names(gc.detect(&images, &[container("r/c@sha256:c")], later + Duration::from_secs(20))),
            ["r/b:1", "r/a:1"]
        );
    }

    #[test]
    fn records_of_removed_images_are_forgotten() {
        let mut gc = ImageGc::new(ImageGcPolicy { min_age: Duration::ZERO, ..Default::default() });
        let t0 = Instant::now();
        gc.detect(&[image("a", "r/a:1", 10)], &[], t0);
        gc.detect(&[], &[], t0);
        assert!(gc.records.is_empty());
    }
}
