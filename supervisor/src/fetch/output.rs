//! The destination side: the hidden `.NAME.part` file, the optional decoder in front of it, and
//! the commit (fsync, no-replace rename, directory fsync).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use flate2::write::MultiGzDecoder;
use xz2::stream::Stream;
use xz2::write::XzDecoder;

use super::{FetchError, XZ_MEMLIMIT};

/// How the received bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Xz,
}

/// The temporary file; removed on drop unless committed.
#[derive(Debug)]
pub(super) struct PartFile {
    dir: File,
    dir_path: PathBuf,
    temp_name: String,
    name: String,
    committed: bool,
}

impl PartFile {
    /// Creates `dir/.NAME.part` exclusively (never following a symlink, never reusing a file).
    pub(super) fn create(dir_path: &Path, name: &str) -> Result<(Self, File), FetchError> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir_path)
            .map_err(|source| FetchError::OpenDir {
                path: dir_path.to_owned(),
                source,
            })?;
        let temp_name = format!(".{name}.part");
        let temp_path = dir_path.join(&temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp_path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    FetchError::PartialExists(temp_path.clone())
                } else {
                    FetchError::CreateTemp {
                        path: temp_path.clone(),
                        source,
                    }
                }
            })?;
        let part = PartFile {
            dir,
            dir_path: dir_path.to_owned(),
            temp_name,
            name: name.to_owned(),
            committed: false,
        };
        Ok((part, file))
    }

    pub(super) fn temp_path(&self) -> PathBuf {
        self.dir_path.join(&self.temp_name)
    }

    /// Flushes `file` (the one [`PartFile::create`] returned) to disk and gives it its final name.
    pub(super) fn commit(mut self, file: File) -> Result<PathBuf, FetchError> {
        let temp_path = self.temp_path();
        let final_path = self.dir_path.join(&self.name);
        file.sync_all().map_err(|source| FetchError::Sync {
            path: temp_path.clone(),
            source,
        })?;
        drop(file);
        rename_noreplace(&self.dir, &self.temp_name, &self.name).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                FetchError::Exists(final_path.clone())
            } else {
                FetchError::Rename {
                    from: temp_path.clone(),
                    to: final_path.clone(),
                    source,
                }
            }
        })?;
        self.committed = true;
        self.dir.sync_all().map_err(|source| FetchError::Sync {
            path: self.dir_path.clone(),
            source,
        })?;
        Ok(final_path)
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.committed {
            let path = self.temp_path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove partial download");
            }
        }
    }
}

/// Renames within `dir`, failing with `AlreadyExists` rather than replacing `to`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(dir: &File, from: &str, to: &str) -> io::Result<()> {
    use nix::fcntl::{RenameFlags, renameat2};
    match renameat2(dir, from, dir, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: the link-based fallback is as safe.
        Err(nix::errno::Errno::EINVAL) => link_then_unlink(dir, from, to),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(dir: &File, from: &str, to: &str) -> io::Result<()> {
    link_then_unlink(dir, from, to)
}

/// `link` fails with `EEXIST` instead of replacing, so the final name appears atomically and only
/// if free.
fn link_then_unlink(dir: &File, from: &str, to: &str) -> io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::unistd::{UnlinkatFlags, linkat, unlinkat};
    linkat(dir, from, dir, to, AtFlags::empty())?;
    unlinkat(dir, from, UnlinkatFlags::NoRemoveDir)?;
    Ok(())
}

/// The file behind the decoder. It keeps its own write error so that a failure of the disk can be
/// told apart from corrupt compressed data when the decoder passes the error up.
#[derive(Debug)]
struct Sink {
    file: File,
    failure: Option<io::Error>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf).map_err(|e| {
            let marker = io::Error::new(e.kind(), "write to the partial file failed");
            self.failure = Some(e);
            marker
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

enum Decoder {
    Plain(Sink),
    Gzip(MultiGzDecoder<Sink>),
    Xz(XzDecoder<Sink>),
}

/// Where received bytes go: straight to the partial file or through a decoder.
pub(super) struct Output {
    decoder: Decoder,
    path: PathBuf,
}

impl Output {
    pub(super) fn new(
        file: File,
        path: PathBuf,
        compression: Compression,
    ) -> Result<Self, FetchError> {
        let sink = Sink {
            file,
            failure: None,
        };
        let decoder = match compression {
            Compression::None => Decoder::Plain(sink),
            Compression::Gzip => Decoder::Gzip(MultiGzDecoder::new(sink)),
            Compression::Xz => {
                let stream = Stream::new_stream_decoder(XZ_MEMLIMIT, xz2::stream::CONCATENATED)
                    .map_err(FetchError::XzInit)?;
                Decoder::Xz(XzDecoder::new_stream(sink, stream))
            }
        };
        Ok(Output { decoder, path })
    }

    pub(super) fn write_all(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        match &mut self.decoder {
            Decoder::Plain(sink) => sink.write_all(chunk).map_err(|e| FetchError::Write {
                path: self.path.clone(),
                source: sink.failure.take().unwrap_or(e),
            }),
            Decoder::Gzip(decoder) => decoder
                .write_all(chunk)
                .map_err(|e| classify(decoder.get_mut(), &self.path, e)),
            Decoder::Xz(decoder) => decoder
                .write_all(chunk)
                .map_err(|e| classify(decoder.get_mut(), &self.path, e)),
        }
    }

    /// Ends the compressed stream (an incomplete one is an error) and returns the file.
    pub(super) fn finish(self) -> Result<File, FetchError> {
        let path = self.path;
        match self.decoder {
            Decoder::Plain(mut sink) => {
                sink.flush()
                    .map_err(|source| FetchError::Write { path, source })?;
                Ok(sink.file)
            }
            Decoder::Gzip(mut decoder) => {
                decoder
                    .try_finish()
                    .map_err(|e| classify(decoder.get_mut(), &path, e))?;
                Ok(decoder.finish().map_err(FetchError::Decompress)?.file)
            }
            Decoder::Xz(mut decoder) => match decoder.finish() {
                Ok(sink) => Ok(sink.file),
                Err(e) => Err(classify(decoder.get_mut(), &path, e)),
            },
        }
    }
}

/// A write error of the file itself, or else the decoder's complaint about its input.
fn classify(sink: &mut Sink, path: &Path, error: io::Error) -> FetchError {
    match sink.failure.take() {
        Some(source) => FetchError::Write {
            path: path.to_owned(),
            source,
        },
        None => FetchError::Decompress(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> Vec<u8> {
        (0u32..200_000)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 1);
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn decode(compression: Compression, input: &[u8]) -> Result<Vec<u8>, FetchError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let mut output = Output::new(file, path.clone(), compression)?;
        for chunk in input.chunks(1000) {
            output.write_all(chunk)?;
        }
        drop(output.finish()?);
        let mut data = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut data).unwrap();
        Ok(data)
    }

    #[test]
    fn gzip_members_concatenated_decode_to_both_parts() {
        let data = sample();
        let (first, second) = data.split_at(12345);
        let input = [gzip(first), gzip(second)].concat();

        assert_eq!(decode(Compression::Gzip, &input).unwrap(), data);
    }

    #[test]
    fn xz_streams_concatenated_decode_to_both_parts() {
        let data = sample();
        let (first, second) = data.split_at(54321);
        let input = [xz(first), xz(second)].concat();

        assert_eq!(decode(Compression::Xz, &input).unwrap(), data);
    }

    #[test]
    fn truncated_gzip_is_a_decompress_error() {
        let input = gzip(&sample());
        let cut = input.get(..input.len() / 2).unwrap();

        assert!(matches!(
            decode(Compression::Gzip, cut),
            Err(FetchError::Decompress(_))
        ));
    }

    #[test]
    fn gzip_missing_only_its_trailer_is_a_decompress_error() {
        let input = gzip(&sample());
        let cut = input.get(..input.len() - 4).unwrap();

        assert!(matches!(
            decode(Compression::Gzip, cut),
            Err(FetchError::Decompress(_))
        ));
    }

    #[test]
    fn truncated_xz_is_a_decompress_error() {
        let input = xz(&sample());
        let cut = input.get(..input.len() - 10).unwrap();

        assert!(matches!(
            decode(Compression::Xz, cut),
            Err(FetchError::Decompress(_))
        ));
    }

    #[test]
    fn garbage_after_xz_stream_is_a_decompress_error() {
        let input = [xz(&sample()), b"not xz at all".to_vec()].concat();

        assert!(matches!(
            decode(Compression::Xz, &input),
            Err(FetchError::Decompress(_))
        ));
    }

    #[test]
    fn plain_bytes_given_as_gzip_are_a_decompress_error() {
        assert!(matches!(
            decode(Compression::Gzip, b"this is not gzip data"),
            Err(FetchError::Decompress(_))
        ));
    }

    #[test]
    fn empty_input_given_as_xz_is_a_decompress_error() {
        assert!(matches!(
            decode(Compression::Xz, b""),
            Err(FetchError::Decompress(_))
        ));
    }

    #[test]
    fn disk_full_is_a_write_error_not_a_decompress_error() {
        let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
            println!("SKIP: /dev/full is missing");
            return;
        };
        let mut output = Output::new(full, PathBuf::from("/dev/full"), Compression::Xz).unwrap();

        let result = output
            .write_all(&xz(&sample()))
            .and_then(|()| output.finish().map(drop));

        assert!(
            matches!(&result, Err(FetchError::Write { source, .. }) if source.raw_os_error() == Some(libc::ENOSPC)),
            "{result:?}"
        );
    }

    #[test]
    fn part_file_is_removed_when_dropped_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let (part, file) = PartFile::create(dir.path(), "x.iso").unwrap();
        let temp = part.temp_path();
        assert!(temp.ends_with(".x.iso.part"));
        assert!(temp.exists());

        drop(file);
        drop(part);

        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn second_part_file_of_same_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = PartFile::create(dir.path(), "x.iso").unwrap();

        let second = PartFile::create(dir.path(), "x.iso");

        assert!(matches!(second, Err(FetchError::PartialExists(_))));
    }

    #[test]
    fn commit_refuses_to_replace_a_file_created_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let (part, mut file) = PartFile::create(dir.path(), "x.iso").unwrap();
        file.write_all(b"new").unwrap();
        std::fs::write(dir.path().join("x.iso"), b"old").unwrap();

        let result = part.commit(file);

        assert!(matches!(result, Err(FetchError::Exists(_))));
        assert_eq!(std::fs::read(dir.path().join("x.iso")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn commit_moves_the_bytes_to_the_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let (part, mut file) = PartFile::create(dir.path(), "x.iso").unwrap();
        file.write_all(b"payload").unwrap();

        let path = part.commit(file).unwrap();

        assert_eq!(path, dir.path().join("x.iso"));
        assert_eq!(std::fs::read(&path).unwrap(), b"payload");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
