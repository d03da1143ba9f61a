//! A file system that forgets what was not synced, for power-loss tests (in the spirit
//! of LazyFS): a FUSE pass-through over a backing directory that keeps every write in
//! memory until the file is fsynced (or fdatasynced), and on [`LazyFs::power_loss`]
//! drops what is still unsynced and unmounts. A test kills the process using it first
//! (the machine lost power), then mounts it again and looks at what survived.
//!
//! Only file contents are lazy: creating, renaming, removing and truncating files reach
//! the backing directory at once (they are durable sooner than on a real disk, which
//! makes the test weaker, never wrongly failing).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Nothing is cached by the kernel beyond a request: sizes change with unsynced writes.
const TTL: Duration = Duration::ZERO;

#[derive(Default)]
struct State {
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next: u64,
    /// Unsynced writes per inode, in the order they were made.
    dirty: HashMap<u64, Vec<(u64, Vec<u8>)>>,
}

struct Lazy {
    backing: PathBuf,
    state: Arc<Mutex<State>>,
    /// Files under this directory (relative) are never really synced: a disk that lies
    /// about fsync, to show that a power-loss test can fail.
    lying_under: Option<PathBuf>,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

impl State {
    fn ino(&mut self, relative: &Path) -> u64 {
        if let Some(ino) = self.inodes.get(relative) {
            return *ino;
        }
        self.next += 1;
        let ino = self.next;
        self.inodes.insert(relative.to_path_buf(), ino);
        self.paths.insert(ino, relative.to_path_buf());
        ino
    }

    fn forget_path(&mut self, relative: &Path) {
        if let Some(ino) = self.inodes.remove(relative) {
            self.paths.remove(&ino);
            self.dirty.remove(&ino);
        }
    }

    /// The size the file has with its unsynced writes.
    fn size(&self, ino: u64, backing: u64) -> u64 {
        let written = self.dirty.get(&ino).into_iter().flatten().map(|(at, data)| at + data.len() as u64);
        written.fold(backing, u64::max)
    }
}

impl Lazy {
    fn relative(&self, ino: INodeNo) -> Option<PathBuf> {
        if ino.0 == 1 {
            return Some(PathBuf::new());
        }
        self.state.lock().unwrap().paths.get(&ino.0).cloned()
    }

    fn attr(&self, ino: u64, relative: &Path) -> std::io::Result<FileAttr> {
        let meta = std::fs::symlink_metadata(self.backing.join(relative))?;
        let size = if meta.is_file() { self.state.lock().unwrap().size(ino, meta.len()) } else { meta.len() };
        let time = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime()),
            mtime: time(meta.mtime()),
            ctime: time(meta.ctime()),
            crtime: time(meta.ctime()),
            kind: if meta.is_dir() { FileType::Directory } else { FileType::RegularFile },
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Option<PathBuf> {
        self.relative(parent).map(|p| p.join(name))
    }

    fn entry(&self, relative: &Path, reply: ReplyEntry) {
        let ino = if relative.as_os_str().is_empty() { 1 } else { self.state.lock().unwrap().ino(relative) };
        match self.attr(ino, relative) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::NotFound {
                    self.state.lock().unwrap().forget_path(relative);
                }
                reply.error(errno(e))
            }
        }
    }

    /// Removes `name` in `parent` with `remove` (a file or a directory) and forgets it.
    fn remove(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty, remove: fn(&Path) -> std::io::Result<()>) {
        let Some(relative) = self.child(parent, name) else { return reply.error(Errno::ENOENT) };
        match remove(&self.backing.join(&relative)) {
            Ok(()) => {
                self.state.lock().unwrap().forget_path(&relative);
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Writes the unsynced data of `ino` to the backing file and syncs it.
    fn sync(&self, ino: u64, relative: &Path) -> std::io::Result<()> {
        let writes = self.state.lock().unwrap().dirty.remove(&ino).unwrap_or_default();
        let file = std::fs::OpenOptions::new().write(true).open(self.backing.join(relative))?;
        for (at, data) in &writes {
            file.write_all_at(data, *at)?;
        }
        file.sync_all()
    }
}

impl Filesystem for Lazy {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Some(relative) => self.entry(&relative, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.relative(ino).map(|p| self.attr(ino.0, &p)) {
            Some(Ok(attr)) => reply.attr(&TTL, &attr),
            Some(Err(e)) => reply.error(errno(e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(relative) = self.relative(ino) else { return reply.error(Errno::ENOENT) };
        let path = self.backing.join(&relative);
        let result = (|| -> std::io::Result<()> {
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if let Some(size) = size {
                // Truncation is applied at once; unsynced writes past it are cut.
                std::fs::OpenOptions::new().write(true).open(&path)?.set_len(size)?;
                if let Some(writes) = self.state.lock().unwrap().dirty.get_mut(&ino.0) {
                    for (at, data) in writes.iter_mut() {
                        data.truncate(size.saturating_sub(*at) as usize);
                    }
                    writes.retain(|(_, data)| !data.is_empty());
                }
            }
            Ok(())
        })();
        match result.and_then(|()| self.attr(ino.0, &relative)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let Some(relative) = self.child(parent, name) else { return reply.error(Errno::ENOENT) };
        match std::fs::create_dir(self.backing.join(&relative)) {
            Ok(()) => {
                let _ = std::fs::set_permissions(self.backing.join(&relative), std::fs::Permissions::from_mode(mode));
                self.entry(&relative, reply)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |p| std::fs::remove_file(p));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |p| std::fs::remove_dir(p));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname)) else {
            return reply.error(Errno::ENOENT);
        };
        match std::fs::rename(self.backing.join(&from), self.backing.join(&to)) {
            Ok(()) => {
                let mut state = self.state.lock().unwrap();
                state.forget_path(&to);
                // Whatever lived under the old name (a directory's children too) moves.
                let moved: Vec<(PathBuf, u64)> =
                    state.inodes.iter().filter(|(p, _)| p.starts_with(&from)).map(|(p, i)| (p.clone(), *i)).collect();
                for (old, ino) in moved {
                    let rest = old.strip_prefix(&from).unwrap();
                    // (`join("")` would add a trailing slash: not a file's path.)
                    let new = if rest.as_os_str().is_empty() { to.clone() } else { to.join(rest) };
                    state.inodes.remove(&old);
                    state.inodes.insert(new.clone(), ino);
                    state.paths.insert(ino, new);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(relative) = self.relative(ino) else { return reply.error(Errno::ENOENT) };
        let file = match std::fs::File::open(self.backing.join(&relative)) {
            Ok(file) => file,
            Err(e) => return reply.error(errno(e)),
        };
        let backing_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let state = self.state.lock().unwrap();
        let end = state.size(ino.0, backing_len).min(offset + u64::from(size));
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return reply.error(errno(e)),
            }
        }
        for (at, data) in state.dirty.get(&ino.0).into_iter().flatten() {
            let (from, to) = ((*at).max(offset), (at + data.len() as u64).min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
        }
        reply.data(&buf);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.state.lock().unwrap().dirty.entry(ino.0).or_default().push((offset, data.to_vec()));
        reply.written(data.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let relative = self.relative(ino);
        if let (Some(relative), Some(lying)) = (&relative, &self.lying_under) {
            if relative.starts_with(lying) {
                return reply.ok();
            }
        }
        match relative.map(|p| self.sync(ino.0, &p)) {
            Some(Ok(())) => reply.ok(),
            Some(Err(e)) => reply.error(errno(e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(relative) = self.relative(ino) else { return reply.error(Errno::ENOENT) };
        let entries = match std::fs::read_dir(self.backing.join(&relative)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(e)),
        };
        let mut all = vec![(ino.0, FileType::Directory, ".".into()), (1, FileType::Directory, "..".into())];
        for entry in entries.flatten() {
            let kind =
                if entry.file_type().is_ok_and(|t| t.is_dir()) { FileType::Directory } else { FileType::RegularFile };
            let child = self.state.lock().unwrap().ino(&relative.join(entry.file_name()));
            all.push((child, kind, entry.file_name()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(relative) = self.child(parent, name) else { return reply.error(Errno::ENOENT) };
        let path = self.backing.join(&relative);
        let created = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&path);
        if let Err(e) = created {
            return reply.error(errno(e));
        }
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777));
        let ino = self.state.lock().unwrap().ino(&relative);
        match self.attr(ino, &relative) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// A mounted lazy file system.
pub struct LazyFs {
    session: Option<fuser::BackgroundSession>,
    state: Arc<Mutex<State>>,
    pub mountpoint: PathBuf,
}

impl LazyFs {
    /// Mounts `backing` at `mountpoint` (both directories).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Self {
        Self::mount_lying(backing, mountpoint, None)
    }

    /// Like `mount`, but fsync of files under `lying_under` (relative to the mount)
    /// does nothing: durability deliberately off there.
    pub fn mount_lying(backing: &Path, mountpoint: &Path, lying_under: Option<&Path>) -> Self {
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mountpoint).unwrap();
        let state = Arc::new(Mutex::new(State { next: 1, ..Default::default() }));
        let lying_under = lying_under.map(Path::to_path_buf);
        let fs = Lazy { backing: backing.to_path_buf(), state: state.clone(), lying_under };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("krate-lazyfs".into()), MountOption::DefaultPermissions];
        let session = fuser::spawn_mount(fs, mountpoint, &config).expect("mounting the lazy file system (FUSE)");
        LazyFs { session: Some(session), state, mountpoint: mountpoint.to_path_buf() }
    }

    /// Bytes written and not yet synced.
    pub fn unsynced_bytes(&self) -> usize {
        self.state.lock().unwrap().dirty.values().flatten().map(|(_, d)| d.len()).sum()
    }

    /// The machine loses power: unsynced writes are gone, the file system unmounted.
    /// Returns how many bytes were lost.
    pub fn power_loss(mut self) -> usize {
        let lost = self.unsynced_bytes();
        self.state.lock().unwrap().dirty.clear();
        self.session.take();
        lost
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.session.take();
    }
}
