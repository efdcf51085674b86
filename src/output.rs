//! The output folder and how a body becomes a durable file in it.
//!
//! Bodies are written to unnamed files (`O_TMPFILE`, see [`unnamed`]) or,
//! where the filesystem has none, to the folder's own temp area,
//! `.jobrun-tmp/run-ID/`; never under their final names. A batch of finished
//! bodies is made durable together: list the batch in the run's manifest,
//! sync the filesystem (the bodies' data and the manifest), link or rename
//! each into place, sync again (the names), and only then may the database
//! mark them done. One `syncfs` per
//! step costs the same for one file or a thousand, which is what lets
//! durability keep up with the network.
//!
//! jobrun touches only what it wrote. Every name is resolved from a handle
//! on the output folder, one folder at a time, never through a symlink and
//! never onto another filesystem (one `syncfs` would not cover it). A name
//! that meets a symlink, a folder, a special file or the state database
//! fails that one URL. A file is removed only when jobrun can prove it wrote
//! it: its size and sha256 are what the manifest or the row recorded.
//!
//! A crash leaves named temp files (removed when the next run starts; the
//! unnamed ones the filesystem frees) and, between the renames and the
//! commit, files whose rows are not done: the next run
//! reads the dead run's manifest and removes those, so they are fetched
//! again.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod error;

pub use error::{Context, Error, Result};
use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::crashpoint::{self, Step};
use crate::domain::RowState;

mod unnamed;

use unnamed::Unnamed;

/// The temp area inside the output folder.
pub const TEMP_DIR: &str = ".jobrun-tmp";

/// Temp files are spread over this many folders. Creating a file locks its
/// folder while the filesystem finds it an inode; in one shared folder the
/// workers' threads and the renames kept waiting for each other.
const TEMP_SHARDS: i64 = 16;

/// The file in a run's temp folder that lists the batch being renamed.
const MANIFEST: &str = "manifest";

/// A body jobrun wrote for row `id`: its name in the output folder, its size
/// and sha256. A staged body, a manifest line and a done row's record are
/// all this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub id: i64,
    pub name: String,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// Why one file could not be put in place.
#[derive(Debug, thiserror::Error)]
enum PlaceError {
    /// This name cannot be used: its URL fails, the run goes on.
    #[error("{0}")]
    Name(String),
    /// The output folder as a whole cannot be written: the run stops.
    #[error(transparent)]
    Output(Error),
}

/// A folder opened by jobrun, with its identity.
struct Folder {
    fd: OwnedFd,
    dev: u64,
    ino: u64,
}

impl Folder {
    fn new(fd: OwnedFd) -> io::Result<Folder> {
        let stat = rustix::fs::fstat(&fd)?;
        Ok(Folder {
            fd,
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }
}

/// The state database and its side files, which no name may hit.
#[derive(Debug, Default)]
struct Protected {
    /// (device, inode) of a folder, and a name in it.
    names: Vec<(u64, u64, OsString)>,
    /// (device, inode) of the files themselves.
    files: Vec<(u64, u64)>,
}

impl Protected {
    fn of_database(db: &Path) -> Protected {
        use std::os::unix::fs::MetadataExt;
        let mut protected = Protected::default();
        let real = db.canonicalize().ok();
        for path in std::iter::once(db).chain(real.as_deref()) {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            let Ok(folder) = std::fs::metadata(parent) else {
                continue;
            };
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut side = name.to_os_string();
                side.push(suffix);
                if let Ok(file) = std::fs::metadata(parent.join(&side)) {
                    protected.files.push((file.dev(), file.ino()));
                }
                protected.names.push((folder.dev(), folder.ino(), side));
            }
        }
        protected
    }

    fn covers(&self, folder: &Folder, name: &OsStr, file: Option<(u64, u64)>) -> bool {
        self.names
            .iter()
            .any(|(dev, ino, n)| *dev == folder.dev && *ino == folder.ino && n == name)
            || file.is_some_and(|file| self.files.contains(&file))
    }
}

/// One of the run's temp folders, opened once per run.
#[derive(Debug)]
struct Shard {
    fd: OwnedFd,
    path: PathBuf,
}

/// A row's temp file: unnamed until its batch, or named in one of the
/// run's temp folders, reached by handle.
#[derive(Clone)]
pub struct TempFile {
    shard: Arc<Shard>,
    unnamed: Option<Arc<Unnamed>>,
    id: i64,
}

impl std::fmt::Debug for TempFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempFile")
            .field("shard", &self.shard)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A temp file open for its body.
pub struct BodyFile(Arc<File>);

impl Write for BodyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

impl TempFile {
    /// Creates (or empties) the file, for writing.
    pub fn create(&self) -> io::Result<BodyFile> {
        if let Some(file) = self.unnamed.as_ref().and_then(|u| u.create(self.id)) {
            return file.map(BodyFile);
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(
            &self.shard.fd,
            self.id.to_string(),
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )?;
        Ok(BodyFile(Arc::new(File::from(fd))))
    }

    /// Removes the file if it is there.
    pub fn remove(&self) {
        if self
            .unnamed
            .as_ref()
            .and_then(|u| u.take(self.id))
            .is_some()
        {
            return;
        }
        let _ = rustix::fs::unlinkat(&self.shard.fd, self.id.to_string(), AtFlags::empty());
    }

    /// Where it is, for messages.
    pub fn path(&self) -> PathBuf {
        self.shard.path.join(self.id.to_string())
    }
}

/// The temp folder of a run that is gone, with the manifest it left.
pub struct Leftover {
    name: String,
    folder: OwnedFd,
    manifest: Vec<Written>,
}

impl Leftover {
    /// The rows whose files the dead run may have renamed into place.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.manifest.iter().map(|written| written.id)
    }
}

pub struct OutputDir {
    root_path: PathBuf,
    root: Folder,
    temp_area: OwnedFd,
    /// This run's temp folder, and its shard folders.
    run_name: String,
    run_folder: OwnedFd,
    shards: Vec<Arc<Shard>>,
    /// None where bodies go to named temp files.
    unnamed: Option<Arc<Unnamed>>,
    protected: Protected,
}

impl OutputDir {
    /// Opens (creating if needed) the output folder for run `run`, removes
    /// the temp files of runs not in `live_runs`, and returns their
    /// manifests, to be settled with [`OutputDir::settle`]. `db` is the
    /// state database, which no name may replace.
    pub fn open(
        root: &Path,
        run: i64,
        live_runs: &[i64],
        db: &Path,
    ) -> Result<(OutputDir, Vec<Leftover>)> {
        ensure_folder(root)?;
        // `--out` itself may be a symlink: it is followed here, once.
        let root_fd = rustix::fs::openat(
            CWD,
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .and_then(Folder::new)
        .map_err(|e| local_write_error(e, "cannot open the output folder", root))?;
        let temp_path = root.join(TEMP_DIR);
        let (temp_area, run_folder, shards) = make_temp_area(&root_fd, &temp_path, run)?;
        let run_name = format!("run-{run}");
        let leftovers = dead_runs(&temp_area, &temp_path, run, live_runs);
        let run_path = temp_path.join(&run_name);
        let shards: Vec<Arc<Shard>> = (0..TEMP_SHARDS)
            .zip(shards)
            .map(|(shard, fd)| {
                let path = run_path.join(shard.to_string());
                Arc::new(Shard { fd, path })
            })
            .collect();
        let unnamed =
            Unnamed::start(&run_folder, shards.iter().map(|s| s.fd.as_fd())).map(Arc::new);
        let out = OutputDir {
            root_path: root.to_path_buf(),
            root: root_fd,
            temp_area,
            run_name,
            run_folder,
            shards,
            unnamed,
            protected: Protected::of_database(db),
        };
        Ok((out, leftovers))
    }

    /// Where the body of row `id` is written before it is durable.
    pub fn temp_file(&self, id: i64) -> TempFile {
        TempFile {
            shard: self.shards[id.rem_euclid(TEMP_SHARDS) as usize].clone(),
            unnamed: self.unnamed.clone(),
            id,
        }
    }

    /// Makes every staged body durable under its final name. When this
    /// returns, the files and their names survive a power cut, except those
    /// of the rows it lists, whose names cannot be used (their temp files
    /// are gone). An error means the output folder cannot be written: no
    /// file of the batch is left in place.
    pub fn make_durable(&self, staged: &[Written]) -> Result<Vec<(i64, String)>> {
        if staged.is_empty() {
            return Ok(Vec::new());
        }
        self.write_manifest(staged)?;
        crashpoint::passed(Step::TempWritten);
        self.check_still_there()?;
        self.sync()?;
        crashpoint::passed(Step::DataSynced);
        let mut folders = HashMap::new();
        let mut placed = Vec::with_capacity(staged.len());
        let mut refused = Vec::new();
        for file in staged {
            match self.place(file, &mut folders) {
                Ok(()) => {
                    placed.push(file);
                    crashpoint::passed(Step::Renamed);
                }
                Err(PlaceError::Name(why)) => {
                    self.temp_file(file.id).remove();
                    refused.push((file.id, why));
                }
                Err(PlaceError::Output(error)) => {
                    self.take_back(&placed);
                    return Err(error);
                }
            }
        }
        if let Err(error) = self.sync() {
            self.take_back(&placed);
            return Err(error);
        }
        crashpoint::passed(Step::NamesSynced);
        Ok(refused)
    }

    /// Removes the file at `file.name` if it is the one described: a
    /// regular file beneath the output folder with that size and sha256.
    /// Anything else there is left alone. True when it was removed.
    pub fn remove_if_written(&self, file: &Written) -> io::Result<bool> {
        if check_output_name(&file.name).is_err() {
            return Ok(false);
        }
        let (folder, leaf) = match file.name.rsplit_once('/') {
            Some((dir, leaf)) => match self.open_folder(dir, false) {
                Ok(folder) => (Some(folder), leaf),
                Err(_) => return Ok(false),
            },
            None => (None, file.name.as_str()),
        };
        let folder = folder.as_ref().unwrap_or(&self.root);
        let stat = match rustix::fs::statat(&folder.fd, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let identity = (stat.st_dev, stat.st_ino);
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile
            || stat.st_size as u64 != file.bytes
            || stat.st_dev != folder.dev
            || self
                .protected
                .covers(folder, OsStr::new(leaf), Some(identity))
        {
            return Ok(false);
        }
        // NONBLOCK: should a FIFO take its place meanwhile, opening it does
        // not wait for a writer.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&folder.fd, leaf, flags, Mode::empty())?;
        let opened = rustix::fs::fstat(&fd)?;
        if (opened.st_dev, opened.st_ino) != identity {
            return Ok(false);
        }
        let mut hasher = Sha256::new();
        io::copy(&mut File::from(fd), &mut hasher)?;
        if <[u8; 32]>::from(hasher.finalize()) != file.sha256 {
            return Ok(false);
        }
        rustix::fs::unlinkat(&folder.fd, leaf, AtFlags::empty())?;
        Ok(true)
    }

    /// Settles what dead runs left: a listed file whose row is not done
    /// and not held by a live run is removed when it is the body the run
    /// wrote (it is fetched again). A dead run's folder goes once all its
    /// files are settled; until then the next start tries again.
    /// `states` must stay true while this runs (the caller holds the
    /// database's write lock).
    pub fn settle(&self, leftovers: Vec<Leftover>, states: &HashMap<i64, RowState>) {
        for leftover in leftovers {
            let mut settled = true;
            for written in &leftover.manifest {
                match states.get(&written.id).copied().unwrap_or(RowState::Free) {
                    RowState::Done => {}
                    RowState::Held => settled = false,
                    RowState::Free => match self.remove_if_written(written) {
                        Ok(true) => tracing::debug!(
                            "removed {}: renamed into place by a run that died before \
                             marking it done",
                            self.root_path.join(&written.name).display()
                        ),
                        Ok(false) => {}
                        Err(error) => {
                            settled = false;
                            tracing::warn!(
                                "cannot remove {}, left by a run that died: {error}",
                                self.root_path.join(&written.name).display()
                            );
                        }
                    },
                }
            }
            if settled {
                let _ = rustix::fs::unlinkat(&leftover.folder, MANIFEST, AtFlags::empty());
                let _ = rustix::fs::unlinkat(&self.temp_area, &leftover.name, AtFlags::REMOVEDIR);
            }
        }
    }

    /// The temp folder of run `run`, found dead while this one runs, for
    /// [`OutputDir::settle`].
    pub fn leftover_of(&self, run: i64) -> Option<Leftover> {
        let name = format!("run-{run}");
        let path = self.root_path.join(TEMP_DIR).join(&name);
        leftover(&self.temp_area, &path, name)
    }

    /// Removes this run's temp files and folder, and the temp area when it
    /// is empty. With `keep_manifest` (the run stopped on an error, with a
    /// batch perhaps in place but not committed), the manifest stays for
    /// the next run to settle.
    pub fn close(self, keep_manifest: bool) -> Result<()> {
        if let Some(unnamed) = &self.unnamed {
            let (ahead, on_the_spot) = unnamed.counts();
            tracing::debug!("unnamed temp files: {ahead} created ahead, {on_the_spot} on the spot");
        }
        let run_path = self.root_path.join(TEMP_DIR).join(&self.run_name);
        remove_temp_files(&self.run_folder, &run_path);
        if !keep_manifest {
            let _ = rustix::fs::unlinkat(&self.run_folder, MANIFEST, AtFlags::empty());
        }
        match rustix::fs::unlinkat(&self.temp_area, &self.run_name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::NOTEMPTY) if keep_manifest => {}
            Err(e) => {
                let error = io::Error::from(e);
                return Err(error).with_context(|| format!("cannot remove {}", run_path.display()));
            }
        }
        // Another run may still be using the temp area; then it stays.
        let _ = rustix::fs::unlinkat(&self.root.fd, TEMP_DIR, AtFlags::REMOVEDIR);
        Ok(())
    }

    /// Lists the batch in the run's manifest, before the data sync that
    /// makes the manifest durable with the bodies.
    fn write_manifest(&self, staged: &[Written]) -> Result<()> {
        let mut text = String::with_capacity(staged.len() * 128);
        for file in staged {
            text.push_str(&manifest_line(file));
        }
        let path = || {
            self.root_path
                .join(TEMP_DIR)
                .join(&self.run_name)
                .join(MANIFEST)
        };
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW;
        rustix::fs::openat(
            &self.run_folder,
            MANIFEST,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io::Error::from)
        .and_then(|fd| File::from(fd).write_all(text.as_bytes()))
        .map_err(|e| local_write_error(e, "cannot write", &path()))
    }

    /// The output folder is still where `--out` says: moved or removed
    /// during the run, its files would land where nobody looks.
    fn check_still_there(&self) -> Result<()> {
        match rustix::fs::statat(CWD, &self.root_path, AtFlags::empty()) {
            Ok(stat) if (stat.st_dev, stat.st_ino) == (self.root.dev, self.root.ino) => Ok(()),
            _ => Err(local_write_error(
                io::Error::from_raw_os_error(libc::ENOENT),
                "the output folder is no longer at",
                &self.root_path,
            )),
        }
    }

    /// Syncs the output folder's filesystem.
    fn sync(&self) -> Result<()> {
        syncfs(&self.root.fd).map_err(|e| {
            local_write_error(e, "cannot flush to disk the output folder", &self.root_path)
        })
    }

    /// Renames one staged body into place, if its name may be used.
    fn place(
        &self,
        file: &Written,
        folders: &mut HashMap<String, Folder>,
    ) -> Result<(), PlaceError> {
        self.try_place(file, folders).map_err(|error| match error {
            PlaceError::Name(why) => {
                let target = self.root_path.join(&file.name);
                PlaceError::Name(format!("cannot write {}: {why}", target.display()))
            }
            output => output,
        })
    }

    fn try_place(
        &self,
        file: &Written,
        folders: &mut HashMap<String, Folder>,
    ) -> Result<(), PlaceError> {
        let (folder, leaf) = match file.name.rsplit_once('/') {
            Some((dir, leaf)) => {
                if !folders.contains_key(dir) {
                    let opened = self.open_folder(dir, true)?;
                    folders.insert(dir.to_string(), opened);
                }
                (&folders[dir], leaf)
            }
            None => (&self.root, file.name.as_str()),
        };
        let target = || self.root_path.join(&file.name);
        // An unnamed body is linked in straight away: a link never replaces
        // anything, so where the name is free (nearly always) the checks
        // below, which cost a lookup per file, are not needed.
        let unnamed = self
            .unnamed
            .as_ref()
            .and_then(|u| Some((u, u.take(file.id)?)));
        if let Some((unnamed, body)) = &unnamed
            && !self.protected.covers(folder, OsStr::new(leaf), None)
        {
            match unnamed.link(body, folder.fd.as_fd(), leaf) {
                Ok(()) => return Ok(()),
                // Something has the name: checked below.
                Err(Errno::EXIST) => {}
                Err(e) => return Err(self.classify(e, &target())),
            }
        }
        let refuse = |what: &str| {
            PlaceError::Name(format!(
                "it is {what}, and jobrun replaces only regular files; remove it or give the \
                 URL another name"
            ))
        };
        let existing = match rustix::fs::statat(&folder.fd, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Some(stat),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(self.classify(e, &target())),
        };
        let identity = existing.as_ref().map(|stat| (stat.st_dev, stat.st_ino));
        if self.protected.covers(folder, OsStr::new(leaf), identity) {
            return Err(PlaceError::Name(
                "it is jobrun's state database or one of its files; give the URL another name"
                    .into(),
            ));
        }
        if let Some(stat) = existing {
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile if stat.st_dev != folder.dev => {
                    return Err(refuse("a mount point of another filesystem"));
                }
                FileType::RegularFile => {}
                FileType::Directory => return Err(refuse("a folder")),
                FileType::Symlink => return Err(refuse("a symbolic link")),
                FileType::Fifo => return Err(refuse("a FIFO")),
                FileType::Socket => return Err(refuse("a socket")),
                _ => return Err(refuse("a device")),
            }
        }
        let shard = &self.shards[file.id.rem_euclid(TEMP_SHARDS) as usize];
        let temp_name = file.id.to_string();
        if let Some((unnamed, body)) = unnamed {
            if existing.is_none() {
                match unnamed.link(&body, folder.fd.as_fd(), leaf) {
                    Ok(()) => return Ok(()),
                    // Something took the name meanwhile: replaced below.
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.classify(e, &target())),
                }
            }
            // A link cannot replace a file: the body gets its temp name,
            // which the rename below puts in place.
            let _ = rustix::fs::unlinkat(&shard.fd, &temp_name, AtFlags::empty());
            unnamed
                .link(&body, shard.fd.as_fd(), &temp_name)
                .map_err(|e| self.classify(e, &shard.path.join(&temp_name)))?;
        }
        match rustix::fs::renameat(&shard.fd, &temp_name, &folder.fd, leaf) {
            Ok(()) => Ok(()),
            // Something took the name meanwhile.
            Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => Err(refuse("a folder")),
            Err(Errno::BUSY) => Err(refuse("a mount point")),
            Err(e) => Err(self.classify(e, &target())),
        }
    }

    /// Opens the folder `dir` (a relative name) beneath the output folder,
    /// one part at a time, creating missing parts when `create` is set. A
    /// part that is a symlink, not a folder, or another filesystem refuses
    /// the name.
    fn open_folder(&self, dir: &str, create: bool) -> Result<Folder, PlaceError> {
        let mut current: Option<OwnedFd> = None;
        let mut path = self.root_path.clone();
        for part in dir.split('/') {
            path.push(part);
            let at = current
                .as_ref()
                .map_or(self.root.fd.as_fd(), |fd| fd.as_fd());
            let opened = match open_child_folder(at, part) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(at, part, Mode::from_raw_mode(0o777)) {
                        Ok(()) | Err(Errno::EXIST) => open_child_folder(at, part),
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            current = Some(opened.map_err(|e| self.classify(e, &path))?);
        }
        let fd = current.expect("a name's folder has at least one part");
        Folder::new(fd).map_err(|e| PlaceError::Output(local_write_error(e, "cannot use", &path)))
    }

    /// Sorts an error about `path` into a problem of that name or of the
    /// whole output folder.
    fn classify(&self, error: Errno, path: &Path) -> PlaceError {
        let display = path.display();
        let why = match error {
            Errno::LOOP => {
                "is a symbolic link, and jobrun never follows links inside the output folder"
            }
            Errno::NOTDIR => "is not a folder",
            Errno::XDEV => {
                "is another filesystem mounted there, which a sync of the output folder's \
                 filesystem would not cover"
            }
            Errno::NAMETOOLONG => "is too long a name for this filesystem",
            _ => {
                return PlaceError::Output(local_write_error(error.into(), "cannot write", path));
            }
        };
        PlaceError::Name(format!(
            "{display} {why}; remove it or give the URL another name"
        ))
    }

    /// After an error that stops the run: removes the files of the batch
    /// already renamed into place (their rows are not done and are still
    /// this run's). What cannot be removed stays listed in the manifest.
    fn take_back(&self, placed: &[&Written]) {
        for file in placed {
            let _ = self.remove_if_written(file);
        }
    }
}

/// The temp area, this run's folder in it and the run's shard folders.
type TempFolders = (OwnedFd, OwnedFd, Vec<OwnedFd>);

/// Creates (or opens) the temp area and this run's folders in it. The temp
/// area must be a real folder on the output folder's filesystem: a symlink
/// there is refused, never followed.
fn make_temp_area(root: &Folder, temp_path: &Path, run: i64) -> Result<TempFolders> {
    let run_name = format!("run-{run}");
    let attempt = || -> Result<TempFolders, (Errno, PathBuf)> {
        let temp_area = make_folder(root.fd.as_fd(), TEMP_DIR, 0o700)
            .map_err(|e| (e, temp_path.to_path_buf()))?;
        let run_path = temp_path.join(&run_name);
        let run_folder =
            make_folder(temp_area.as_fd(), &run_name, 0o700).map_err(|e| (e, run_path.clone()))?;
        let shards = (0..TEMP_SHARDS)
            .map(|shard| {
                let name = shard.to_string();
                make_folder(run_folder.as_fd(), &name, 0o700).map_err(|e| (e, run_path.join(&name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((temp_area, run_folder, shards))
    };
    // A run ending at this moment may remove the empty temp area between
    // its creation and this run's folder's; once more is enough.
    let result = match attempt() {
        Err((Errno::NOENT, _)) => attempt(),
        other => other,
    };
    let (errno, path) = match result {
        Ok(folders) => return Ok(folders),
        Err(refused) => refused,
    };
    let display = path.display();
    match errno {
        Errno::LOOP => Err(Error::Folder(format!(
            "{display} is a symbolic link, not jobrun's temp folder: remove the link (what it \
             points to is left alone) and run again"
        ))),
        Errno::NOTDIR => Err(Error::Folder(format!(
            "{display} is not a folder, so it is not jobrun's temp folder: move it away and \
             run again"
        ))),
        Errno::XDEV => Err(Error::Folder(format!(
            "{display} is another filesystem mounted there; jobrun's temp files must be on \
             the output folder's own filesystem: unmount it and run again"
        ))),
        e => Err(local_write_error(
            e.into(),
            "cannot create the temp folder",
            &path,
        )),
    }
}

/// Creates the folder `name` in `at` unless it is there, and opens it.
fn make_folder(at: BorrowedFd<'_>, name: &str, mode: u32) -> rustix::io::Result<OwnedFd> {
    match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => open_child_folder(at, name),
        Err(e) => Err(e),
    }
}

/// Opens the folder `name` in `at` without following a symlink and without
/// leaving `at`'s filesystem.
fn open_child_folder(at: BorrowedFd<'_>, name: &str) -> rustix::io::Result<OwnedFd> {
    open_no_symlinks(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
    )
}

/// Opens `name` beneath `at` with `flags`, following no symlink on the way
/// and leaving neither `at` nor its filesystem (`XDEV` when it would).
pub(crate) fn open_no_symlinks(
    at: BorrowedFd<'_>,
    name: &str,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::ResolveFlags;
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
        // openat2 asks to try again when a rename elsewhere raced it.
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(at, name, flags, Mode::empty(), resolve) {
                Err(Errno::AGAIN) if tries < 8 => tries += 1,
                other => return other,
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let fd = rustix::fs::openat(at, name, flags | OFlags::NOFOLLOW, Mode::empty())?;
        if rustix::fs::fstat(&fd)?.st_dev != rustix::fs::fstat(at)?.st_dev {
            return Err(Errno::XDEV);
        }
        Ok(fd)
    }
}

/// The names in a folder, `.` and `..` left out.
fn names_in(folder: BorrowedFd<'_>) -> Vec<String> {
    let Ok(mut dir) = Dir::read_from(folder) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    while let Some(Ok(entry)) = dir.read() {
        let name = entry.file_name().to_string_lossy();
        if name != "." && name != ".." {
            names.push(name.into_owned());
        }
    }
    names
}

fn is_number(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

/// Says that something jobrun did not make is left where it is.
fn leave_alone(path: &Path) {
    tracing::warn!(
        "left {} as it is: jobrun did not make it (remove it if nothing needs it)",
        path.display()
    );
}

/// Says that a folder jobrun made is left for a later run to clear, since
/// this process may open no more files.
fn clear_later(path: &Path, error: Errno) {
    let error = io::Error::from(error);
    tracing::warn!(
        "left {} for a later run to clear: {error}; {}",
        path.display(),
        out_of_descriptors(&error).unwrap_or("")
    );
}

/// The temp folders of runs that are gone: their temp files are removed,
/// their manifests read. Anything in the temp area jobrun did not make is
/// left alone and reported.
fn dead_runs(temp_area: &OwnedFd, temp_path: &Path, run: i64, live_runs: &[i64]) -> Vec<Leftover> {
    let mut leftovers = Vec::new();
    for name in names_in(temp_area.as_fd()) {
        let path = temp_path.join(&name);
        let Some(id) = name.strip_prefix("run-").filter(|id| is_number(id)) else {
            leave_alone(&path);
            continue;
        };
        // Runs numbered above `run` started after it looked for live runs,
        // so they are live too.
        match id.parse::<i64>() {
            Ok(id) if id >= run || live_runs.contains(&id) => continue,
            Ok(_) => {}
            Err(_) => {
                leave_alone(&path);
                continue;
            }
        }
        leftovers.extend(leftover(temp_area, &path, name));
    }
    leftovers
}

/// The temp folder `name` of a run that is gone: its temp files are
/// removed, its manifest read. None when it is not there or not a folder
/// jobrun made.
fn leftover(temp_area: &OwnedFd, path: &Path, name: String) -> Option<Leftover> {
    let folder = match open_child_folder(temp_area.as_fd(), &name) {
        Ok(folder) => folder,
        Err(Errno::NOENT) => return None,
        Err(e @ (Errno::MFILE | Errno::NFILE)) => {
            clear_later(path, e);
            return None;
        }
        Err(_) => {
            leave_alone(path);
            return None;
        }
    };
    let manifest = read_manifest(&folder);
    remove_temp_files(&folder, path);
    Some(Leftover {
        name,
        folder,
        manifest,
    })
}

/// Removes a run folder's temp files and shard folders. Its manifest stays;
/// anything else is left alone and reported.
fn remove_temp_files(run_folder: &OwnedFd, run_path: &Path) {
    for name in names_in(run_folder.as_fd()) {
        let path = run_path.join(&name);
        if name == MANIFEST {
            continue;
        }
        if name == unnamed::PROBE {
            let _ = rustix::fs::unlinkat(run_folder, &name, AtFlags::empty());
            continue;
        }
        let shard = match open_child_folder(run_folder.as_fd(), &name) {
            Ok(shard) if is_number(&name) => shard,
            Err(e @ (Errno::MFILE | Errno::NFILE)) if is_number(&name) => {
                clear_later(&path, e);
                continue;
            }
            _ => {
                leave_alone(&path);
                continue;
            }
        };
        for temp in names_in(shard.as_fd()) {
            if !is_number(&temp) || rustix::fs::unlinkat(&shard, &temp, AtFlags::empty()).is_err() {
                leave_alone(&path.join(&temp));
            }
        }
        let _ = rustix::fs::unlinkat(run_folder, &name, AtFlags::REMOVEDIR);
    }
}

/// One manifest line: id, size, sha256 and the name as a JSON string (a
/// name may hold a tab or a line break).
fn manifest_line(file: &Written) -> String {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(128 + file.name.len());
    let _ = write!(line, "{}\t{}\t", file.id, file.bytes);
    // Two table lookups a byte rather than a formatting call: this runs for
    // every body of every batch, on the sync thread.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in file.sha256 {
        line.push(char::from(HEX[usize::from(byte >> 4)]));
        line.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    let name = serde_json::to_string(&file.name).unwrap_or_default();
    let _ = writeln!(line, "\t{name}");
    line
}

fn parse_manifest_line(line: &str) -> Option<Written> {
    let mut fields = line.splitn(4, '\t');
    let id = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().ok()?;
    let hex = fields.next()?;
    let name = serde_json::from_str(fields.next()?).ok()?;
    if hex.len() != 64 {
        return None;
    }
    let mut sha256 = [0u8; 32];
    for (i, byte) in sha256.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Written {
        id,
        name,
        bytes,
        sha256,
    })
}

/// The entries of a run folder's manifest; a line cut short by a crash,
/// or anything else that does not parse, is skipped.
fn read_manifest(run_folder: &OwnedFd) -> Vec<Written> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let Ok(fd) = rustix::fs::openat(run_folder, MANIFEST, flags, Mode::empty()) else {
        return Vec::new();
    };
    let mut text = String::new();
    // A batch lists at most a few thousand names.
    let _ = File::from(fd).take(64 << 20).read_to_string(&mut text);
    text.lines().filter_map(parse_manifest_line).collect()
}

/// Makes sure `root` is a folder, creating it if needed.
pub fn ensure_folder(root: &Path) -> Result<()> {
    let display = root.display();
    match std::fs::metadata(root) {
        Ok(meta) if !meta.is_dir() => Err(Error::Folder(format!(
            "the output folder {display} is a file; give --out a folder"
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => std::fs::create_dir_all(root)
            .map_err(|e| local_write_error(e, "cannot create the output folder", root)),
        Err(e) => Err(e).with_context(|| format!("cannot use the output folder {display}")),
    }
}

/// Checks that a file name for a URL stays inside the output folder:
/// relative, plain parts separated by `/` (no empty, `.` or `..` part, no
/// backslash or NUL), and not in the temp area. Used on import, for names
/// given in JSON Lines, and again on every claim, for names recorded by
/// anything else.
pub fn check_output_name(name: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("{name:?} {why}"));
    if name.is_empty() {
        return refuse("is empty");
    }
    if name.len() > 1024 {
        return refuse("is longer than 1024 bytes");
    }
    if name.starts_with('/') {
        return refuse("is absolute; names are relative to the output folder");
    }
    if name.contains('\\') || name.contains('\0') {
        return refuse("has a backslash or NUL; use / between folders");
    }
    for part in name.split('/') {
        match part {
            "" => return refuse("has an empty part (// or a trailing /)"),
            "." | ".." => {
                return refuse(&format!(
                    "has a {part:?} part; names stay inside the output folder"
                ));
            }
            _ if part.len() > 255 => return refuse("has a part longer than 255 bytes"),
            _ => {}
        }
    }
    if name.split('/').next() == Some(TEMP_DIR) {
        return refuse(&format!("is inside jobrun's temp area {TEMP_DIR}"));
    }
    Ok(())
}

/// A failed write in the output folder, with what the user can do about the
/// causes that belong to this machine: a full disk, a read-only or
/// unwritable folder, a folder removed during the run.
pub fn local_write_error(error: io::Error, what: &str, path: &Path) -> Error {
    let advice = match error.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            "the disk is full: free some space on it, then run again"
        }
        ErrorKind::ReadOnlyFilesystem => {
            "the output folder is on a read-only filesystem: make it writable, then run again"
        }
        ErrorKind::PermissionDenied => {
            "this user may not write in the output folder: fix its permissions, then run again"
        }
        ErrorKind::NotFound => {
            "the output folder is gone (removed during the run?): run again to recreate it"
        }
        _ => match out_of_descriptors(&error) {
            Some(advice) => advice,
            None => return Error::from(error).context(format!("{what} {}", path.display())),
        },
    };
    Error::Folder(format!("{what} {}: {error}; {advice}", path.display()))
}

/// What to do when `error` says this process or the system may not open
/// more files (EMFILE, ENFILE): a problem of this machine, not of a URL.
pub fn out_of_descriptors(error: &io::Error) -> Option<&'static str> {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)).then_some(
        "jobrun may not open more files (ulimit -n): raise the limit, or use fewer --workers, \
         then run again",
    )
}

#[cfg(target_os = "linux")]
fn syncfs(folder: &OwnedFd) -> io::Result<()> {
    Ok(rustix::fs::syncfs(folder)?)
}

/// Elsewhere there is no `syncfs`: everything is flushed.
#[cfg(not(target_os = "linux"))]
fn syncfs(_folder: &OwnedFd) -> io::Result<()> {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn written(id: i64, name: &str, body: &[u8]) -> Written {
        Written {
            id,
            name: name.into(),
            bytes: body.len() as u64,
            sha256: Sha256::digest(body).into(),
        }
    }

    #[test]
    fn staged_files_land_under_their_names_and_debris_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let db = dir.path().join("jobrun.db");
        let stale = root.join(TEMP_DIR).join("run-1");
        fs::create_dir_all(stale.join("7")).unwrap();
        fs::write(stale.join("7").join("7"), b"half").unwrap();
        fs::create_dir_all(root.join(TEMP_DIR).join("run-2")).unwrap();
        // A run that started after this one looked for live runs.
        fs::create_dir_all(root.join(TEMP_DIR).join("run-4")).unwrap();

        let (out, leftovers) = OutputDir::open(&root, 3, &[2], &db).unwrap();
        out.settle(leftovers, &HashMap::new());
        assert!(!stale.exists(), "a dead run's temp folder was kept");
        assert!(
            root.join(TEMP_DIR).join("run-4").exists(),
            "a newer run's temp folder was removed"
        );
        assert!(
            root.join(TEMP_DIR).join("run-2").exists(),
            "a live run's temp folder was removed"
        );

        let temp = out.temp_file(9);
        temp.create().unwrap().write_all(b"body").unwrap();
        let refused = out
            .make_durable(&[written(9, "sub/a.json", b"body")])
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(fs::read(root.join("sub/a.json")).unwrap(), b"body");
        assert!(!temp.path().exists());
        out.close(false).unwrap();
        assert!(!root.join(TEMP_DIR).join("run-3").exists());
    }

    #[test]
    fn only_the_very_file_written_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let (out, _) = OutputDir::open(&root, 1, &[], &dir.path().join("db")).unwrap();
        fs::write(root.join("a.json"), b"body").unwrap();
        fs::write(root.join("b.json"), b"BODY").unwrap();
        assert!(
            !out.remove_if_written(&written(1, "b.json", b"body"))
                .unwrap()
        );
        assert!(
            !out.remove_if_written(&written(1, "c.json", b"body"))
                .unwrap()
        );
        assert!(
            out.remove_if_written(&written(1, "a.json", b"body"))
                .unwrap()
        );
        assert!(!root.join("a.json").exists());
        assert!(root.join("b.json").exists());
        out.close(false).unwrap();
    }

    #[test]
    fn a_dead_runs_files_go_only_when_their_rows_are_free() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let db = dir.path().join("jobrun.db");
        let files = [
            written(1, "done.json", b"A"),
            written(2, "held.json", b"B"),
            written(3, "free.json", b"C"),
            written(4, "changed.json", b"D"),
        ];
        let dead = root.join(TEMP_DIR).join("run-1");
        fs::create_dir_all(&dead).unwrap();
        let manifest: String = files.iter().map(manifest_line).collect();
        fs::write(dead.join(MANIFEST), manifest).unwrap();
        for (file, body) in files.iter().zip([b"A", b"B", b"C", b"d"]) {
            fs::write(root.join(&file.name), body).unwrap();
        }
        let states = HashMap::from([
            (1, RowState::Done),
            (2, RowState::Held),
            (3, RowState::Free),
            (4, RowState::Free),
        ]);

        let (out, leftovers) = OutputDir::open(&root, 2, &[], &db).unwrap();
        assert_eq!(leftovers[0].ids().collect::<Vec<_>>(), [1, 2, 3, 4]);
        out.settle(leftovers, &states);
        assert!(root.join("done.json").exists(), "a done row's file went");
        assert!(root.join("held.json").exists(), "a live run's file went");
        assert!(
            !root.join("free.json").exists(),
            "an uncommitted file stayed"
        );
        assert!(
            root.join("changed.json").exists(),
            "a file jobrun did not write went"
        );
        assert!(
            dead.join(MANIFEST).exists(),
            "forgotten while a row was held"
        );
        out.close(false).unwrap();

        // Once the live run let go of its row, the next start settles it.
        let states = HashMap::from([(2, RowState::Free)]);
        let (out, leftovers) = OutputDir::open(&root, 3, &[], &db).unwrap();
        out.settle(leftovers, &states);
        assert!(!root.join("held.json").exists());
        assert!(!dead.exists(), "a settled run's folder stayed");
        out.close(false).unwrap();
        assert!(!root.join(TEMP_DIR).exists());
    }

    #[test]
    fn manifest_lines_read_back_and_a_torn_line_is_skipped() {
        let file = written(42, "tab\there/line\nbreak.json", b"x");
        let line = manifest_line(&file);
        assert_eq!(parse_manifest_line(line.trim_end()), Some(file));
        assert_eq!(parse_manifest_line(&line[..line.len() / 2]), None);
    }

    #[test]
    fn output_names_stay_inside_the_folder() {
        for good in [
            "a.json",
            "0190-uuid",
            "sub/a.json",
            "..a",
            "a..b",
            ".hidden",
            "x/y/z",
        ] {
            assert_eq!(check_output_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../a.json",
            "sub/../../a",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            ".jobrun-tmp/run-1/3",
            "..",
        ] {
            let err = check_output_name(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn an_output_path_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        let err = OutputDir::open(&file, 1, &[], &dir.path().join("db"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is a file"), "{err}");
    }

    /// Stages two bodies, one for a new name and one over an old file,
    /// and makes them durable; says whether each body had a name in the
    /// temp area before its batch.
    fn land_a_batch(out: &OutputDir, root: &Path) -> Vec<bool> {
        fs::write(root.join("old.json"), b"old body").unwrap();
        let files = [written(1, "new/a.json", b"A"), written(2, "old.json", b"B")];
        let mut named = Vec::new();
        for (file, body) in files.iter().zip([b"A", b"B"]) {
            let temp = out.temp_file(file.id);
            temp.create().unwrap().write_all(body).unwrap();
            named.push(temp.path().exists());
        }
        let refused = out.make_durable(&files).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(fs::read(root.join("new/a.json")).unwrap(), b"A");
        assert_eq!(fs::read(root.join("old.json")).unwrap(), b"B");
        for file in &files {
            assert!(!out.temp_file(file.id).path().exists(), "{}", file.name);
        }
        named
    }

    #[test]
    fn bodies_wait_in_unnamed_files_and_their_batch_links_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let (out, _) = OutputDir::open(&root, 1, &[], &dir.path().join("db")).unwrap();
        assert!(
            out.unnamed.is_some(),
            "no O_TMPFILE on the test's filesystem"
        );
        assert_eq!(land_a_batch(&out, &root), [false, false]);
        // A body that fails is dropped: nothing of it is left to remove.
        let temp = out.temp_file(3);
        temp.create().unwrap().write_all(b"partial").unwrap();
        temp.remove();
        assert!(out.unnamed.as_ref().unwrap().take(3).is_none());
        out.close(false).unwrap();
        assert!(!root.join(TEMP_DIR).exists());
    }

    #[test]
    fn without_unnamed_files_bodies_wait_in_named_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let (mut out, _) = OutputDir::open(&root, 1, &[], &dir.path().join("db")).unwrap();
        // As on a filesystem without O_TMPFILE.
        out.unnamed = None;
        assert_eq!(land_a_batch(&out, &root), [true, true]);
        let temp = out.temp_file(3);
        temp.create().unwrap().write_all(b"partial").unwrap();
        temp.remove();
        assert!(!temp.path().exists());
        out.close(false).unwrap();
        assert!(!root.join(TEMP_DIR).exists());
    }

    #[test]
    fn a_start_up_check_left_by_a_crash_is_removed_with_the_run_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let dead = root.join(TEMP_DIR).join("run-1");
        fs::create_dir_all(&dead).unwrap();
        fs::write(dead.join(unnamed::PROBE), b"").unwrap();
        let (out, leftovers) = OutputDir::open(&root, 2, &[], &dir.path().join("db")).unwrap();
        out.settle(leftovers, &HashMap::new());
        assert!(!dead.exists());
        out.close(false).unwrap();
    }
}
