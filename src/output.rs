//! The output folder and how a body becomes a durable file in it.
//!
//! Bodies are written to the folder's own temp area, `.jobrun-tmp/run-ID/`,
//! never under their final names. A batch of finished bodies is made durable
//! together: sync the filesystem (the bodies' data), rename each into place,
//! sync again (the renames), and only then may the database mark them done.
//! One `syncfs` per step costs the same for one file or a thousand, which is
//! what lets durability keep up with the network.
//!
//! A crash leaves at most temp files (removed when the next run starts) and
//! renamed files whose rows are not yet done (fetched again, same name).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::crashpoint::{self, Step};

/// The temp area inside the output folder.
pub const TEMP_DIR: &str = ".jobrun-tmp";

/// Temp files are spread over this many folders. Creating a file locks its
/// folder while the filesystem finds it an inode; in one shared folder the
/// workers' threads and the renames kept waiting for each other.
const TEMP_SHARDS: i64 = 16;

/// A body written under a temp name, waiting to be made durable.
#[derive(Debug)]
pub struct Staged {
    pub temp: PathBuf,
    pub target: PathBuf,
}

pub struct OutputDir {
    root: PathBuf,
    /// Open handle on the folder, for syncing its filesystem.
    handle: File,
    /// This run's temp folder.
    temp: PathBuf,
}

impl OutputDir {
    /// Opens (creating if needed) the output folder for run `run`, and
    /// removes the temp folders of runs not in `live_runs`.
    pub fn open(root: &Path, run: i64, live_runs: &[i64]) -> Result<OutputDir> {
        let display = root.display();
        ensure_folder(root)?;
        let temp_root = root.join(TEMP_DIR);
        remove_dead_temp_dirs(&temp_root, run, live_runs)?;
        let temp = temp_root.join(format!("run-{run}"));
        for shard in 0..TEMP_SHARDS {
            let dir = temp.join(shard.to_string());
            // A run ending at this moment may remove the empty temp area
            // between two folders' creation; once more is enough.
            fs::create_dir_all(&dir)
                .or_else(|_| fs::create_dir_all(&dir))
                .map_err(|e| local_write_error(e, "cannot create the temp folder", &dir))?;
        }
        let handle =
            File::open(root).with_context(|| format!("cannot open the output folder {display}"))?;
        Ok(OutputDir {
            root: root.to_path_buf(),
            handle,
            temp,
        })
    }

    /// Where the body of row `id` is written before it is durable.
    pub fn temp_path(&self, id: i64) -> PathBuf {
        self.temp
            .join((id.rem_euclid(TEMP_SHARDS)).to_string())
            .join(id.to_string())
    }

    /// The final file for a row's recorded path, refused when the path
    /// would lead outside the output folder or into its temp area.
    pub fn target_path(&self, relative: &str) -> Result<PathBuf, String> {
        check_output_name(relative)?;
        Ok(self.root.join(relative))
    }

    /// Makes every staged body durable under its final name. When this
    /// returns, the files and their names survive a power cut.
    pub fn make_durable(&self, staged: &[Staged]) -> Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        crashpoint::passed(Step::TempWritten);
        self.sync_data(staged)?;
        crashpoint::passed(Step::DataSynced);
        let mut parents = HashSet::new();
        for file in staged {
            rename_into_place(file)?;
            crashpoint::passed(Step::Renamed);
            if let Some(parent) = file.target.parent() {
                parents.insert(parent.to_path_buf());
            }
        }
        self.sync_names(&parents)?;
        crashpoint::passed(Step::NamesSynced);
        Ok(())
    }

    /// Removes a row's final file if one is there, e.g. a body renamed into
    /// place just before a crash whose URL then failed for good.
    pub fn remove_target(&self, target: &Path) -> Result<()> {
        match fs::remove_file(target) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", target.display()))
            }
            _ => Ok(()),
        }
    }

    /// Removes this run's temp folder, and the temp area when it is empty.
    pub fn close(self) -> Result<()> {
        match fs::remove_dir_all(&self.temp) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", self.temp.display()));
            }
            _ => {}
        }
        // Another run may still be using the temp area; then it stays.
        let _ = fs::remove_dir(self.root.join(TEMP_DIR));
        Ok(())
    }

    /// Removes the temp folder of run `run`, found dead while this one runs.
    pub fn remove_temp_of(&self, run: i64) -> Result<()> {
        let dir = self.root.join(TEMP_DIR).join(format!("run-{run}"));
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", dir.display()))
            }
            _ => Ok(()),
        }
    }

    #[cfg(target_os = "linux")]
    fn sync_data(&self, _staged: &[Staged]) -> Result<()> {
        syncfs(&self.handle)
            .map_err(|e| local_write_error(e, "cannot flush to disk the output folder", &self.root))
    }

    #[cfg(not(target_os = "linux"))]
    fn sync_data(&self, staged: &[Staged]) -> Result<()> {
        for file in staged {
            File::open(&file.temp)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot flush {} to disk", file.temp.display()))?;
        }
        Ok(())
    }

    #[cfg(target_os = "linux")]
    fn sync_names(&self, _parents: &HashSet<PathBuf>) -> Result<()> {
        self.sync_data(&[])
    }

    #[cfg(not(target_os = "linux"))]
    fn sync_names(&self, parents: &HashSet<PathBuf>) -> Result<()> {
        for dir in parents {
            File::open(dir)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot flush folder {} to disk", dir.display()))?;
        }
        Ok(())
    }
}

/// Makes sure `root` is a folder, creating it if needed.
pub fn ensure_folder(root: &Path) -> Result<()> {
    let display = root.display();
    match fs::metadata(root) {
        Ok(meta) if !meta.is_dir() => {
            bail!("the output folder {display} is a file; give --out a folder")
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => fs::create_dir_all(root)
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
pub fn local_write_error(error: io::Error, what: &str, path: &Path) -> anyhow::Error {
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
        _ => return anyhow::Error::new(error).context(format!("{what} {}", path.display())),
    };
    anyhow::anyhow!("{what} {}: {error}; {advice}", path.display())
}

fn rename_into_place(file: &Staged) -> Result<()> {
    let rename = || fs::rename(&file.temp, &file.target);
    match rename() {
        Err(e) if e.kind() == ErrorKind::NotFound && file.temp.exists() => {
            // The target's folder is missing (a name with folders in it).
            if let Some(parent) = file.target.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create folder {}", parent.display()))?;
            }
            rename()
        }
        other => other,
    }
    .map_err(|e| {
        let what = format!("cannot move {} into place as", file.temp.display());
        local_write_error(e, &what, &file.target)
    })
}

/// Removes every `run-ID` folder of the temp area whose run is not live.
/// Runs numbered above `run` started after it looked for live runs, so
/// they are live too: their folders stay.
fn remove_dead_temp_dirs(temp_root: &Path, run: i64, live_runs: &[i64]) -> Result<()> {
    let entries = match fs::read_dir(temp_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", temp_root.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let live = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|id| id.parse::<i64>().ok())
            .is_some_and(|id| id > run || live_runs.contains(&id));
        if !live {
            let path = entry.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.with_context(|| format!("cannot remove leftover {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn syncfs(handle: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the lifetime of `handle`.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_land_under_their_names_and_debris_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let stale = root.join(TEMP_DIR).join("run-1");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("7"), b"half").unwrap();
        fs::create_dir_all(root.join(TEMP_DIR).join("run-2")).unwrap();
        // A run that started after this one looked for live runs.
        fs::create_dir_all(root.join(TEMP_DIR).join("run-4")).unwrap();

        let out = OutputDir::open(&root, 3, &[2]).unwrap();
        assert!(!stale.exists(), "a dead run's temp folder was kept");
        assert!(
            root.join(TEMP_DIR).join("run-4").exists(),
            "a newer run's temp folder was removed"
        );
        assert!(
            root.join(TEMP_DIR).join("run-2").exists(),
            "a live run's temp folder was removed"
        );

        let temp = out.temp_path(9);
        fs::write(&temp, b"body").unwrap();
        let target = out.target_path("sub/a.json").unwrap();
        out.make_durable(&[Staged {
            temp: temp.clone(),
            target: target.clone(),
        }])
        .unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"body");
        assert!(!temp.exists());
        out.close().unwrap();
        assert!(!root.join(TEMP_DIR).join("run-3").exists());
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
        let err = OutputDir::open(&file, 1, &[]).err().unwrap().to_string();
        assert!(err.contains("is a file"), "{err}");
    }
}
