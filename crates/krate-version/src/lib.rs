//! Where this build of krate came from, following the seeds' versioning document (and
//! upstream's `pkg/version`): built from git, the version is `git describe` of the tree,
//! `v0.1-13-g4567bcdef6789a-dirty` (the nearest `v*` tag, commits since it, the commit,
//! and `-dirty` when the tree had changes), with the full commit, the tree state and a
//! reproducible build date beside it; built outside git (a tarball), it is the version
//! written here, [`SOURCE_VERSION`].
//!
//! Its own small crate because its build script reruns on any change to the tree: only
//! this crate and the `krate` binary rebuild for it, not the libraries.
//!
//! Releasing (two commits, as the seeds): a commit setting [`SOURCE_VERSION`] to `vX.Y`,
//! tagged `git tag -a vX.Y`; then a commit setting it to `vX.(Y+1)-dev`. Every build in
//! between says which release it follows and how far.

/// The version of this source tree outside git: `vX.Y` on a release commit, `vX.Y-dev`
/// between releases.
pub const SOURCE_VERSION: &str = "v0.1-dev";

/// The build's version: `git describe --tags --match 'v*' --abbrev=14` plus `-dirty`; in
/// a repository without a release tag yet, [`SOURCE_VERSION`] with `-g` and the commit;
/// outside git, [`SOURCE_VERSION`].
pub const VERSION: &str = match option_env!("KRATE_GIT_VERSION") {
    Some(version) => version,
    None => SOURCE_VERSION,
};

/// The full commit (`git rev-parse HEAD`); empty outside git.
pub const COMMIT: &str = match option_env!("KRATE_GIT_COMMIT") {
    Some(commit) => commit,
    None => "",
};

/// `clean` or `dirty` (uncommitted or untracked files, as upstream); empty outside git.
pub const TREE_STATE: &str = match option_env!("KRATE_GIT_TREE_STATE") {
    Some(state) => state,
    None => "",
};

/// RFC 3339, UTC: `SOURCE_DATE_EPOCH` when set, else the commit's date (so the same
/// commit builds the same binary), else the epoch.
pub const BUILD_DATE: &str = match option_env!("KRATE_BUILD_DATE") {
    Some(date) => date,
    None => "1970-01-01T00:00:00Z",
};
