import Foundation
import Glibc
import TernWire

/// Writes a paused VM's state and memory to a snapshot file.
///
/// The file appears atomically and only when whole. It is written as an
/// unnamed file (O_TMPFILE) in the target's directory, so a `tern snapshot`
/// killed at any point leaves nothing behind; once it is complete and synced
/// it gets a temporary name (linkat) and is renamed over the target, and the
/// directory is synced, so neither a crash nor a failed write leaves a half
/// snapshot (or destroys an older one) at the path. Where the file system has
/// no O_TMPFILE, a named temporary file (O_EXCL, O_NOFOLLOW) does the same,
/// except that a kill can leave it behind (a hidden `.NAME.tmp-PID`).
public enum SnapshotWriter {
    /// O_TMPFILE (with O_DIRECTORY, as Linux defines it); Glibc's macro is not imported into Swift.
    static let openTemporary: Int32 = 0o20_200_000

    public static func write(state: MachineStateSnapshot, memory: GuestMemory, to path: String) throws -> SnapshotStatistics {
        let started = ContinuousClock.now
        let directory = { let d = (path as NSString).deletingLastPathComponent; return d.isEmpty ? "." : d }()
        let temporary = directory + "/.\((path as NSString).lastPathComponent).tmp-\(getpid())"
        var unnamed = true
        var fd = open(directory, openTemporary | O_WRONLY | O_CLOEXEC, 0o600)
        if fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL) {
            unnamed = false
            fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        }
        guard fd >= 0 else { throw ConfigurationError("cannot create snapshot \(path): \(String(cString: strerror(errno)))") }
        var statistics = SnapshotStatistics()
        do {
            defer { close(fd) }
            let stream = FDStream(fd: fd)
            try stream.writeAll(SnapshotFormat.encodeHeader())
            var frames: UInt64 = 0
            for section in state.sections {
                try stream.writeFrame(.state, payload: section.encoded)
                frames += 1
            }
            let streamer = PageStreamer(memory: memory, stream: stream)
            try memory.forEachExtent { first, count, isHole in
                if isHole { try streamer.addZeroPages(firstPage: first, count: count) } else { try streamer.addPages(firstPage: first, count: count) }
            }
            try streamer.flush()
            frames += streamer.counters.frames
            statistics.dataPages = streamer.counters.dataPages
            statistics.zeroPages = streamer.counters.zeroPages
            let end = SnapshotFormat.EndSummary(frames: frames, dataPages: statistics.dataPages, zeroPages: statistics.zeroPages)
            try stream.writeFrame(.end, payload: end.encoded)
            guard fsync(fd) == 0 else { throw FDStream.IOError(operation: "fsync", errno: errno) }
            statistics.fileBytes = UInt64(lseek(fd, 0, SEEK_CUR))
            if unnamed {
                // Named only now, complete and synced; a name left from a killed run of this pid goes first.
                unlink(temporary)
                guard linkat(AT_FDCWD, "/proc/self/fd/\(fd)", AT_FDCWD, temporary, AT_SYMLINK_FOLLOW) == 0 else {
                    throw FDStream.IOError(operation: "linkat", errno: errno)
                }
            }
        } catch {
            unlink(temporary)
            throw ConfigurationError("cannot write snapshot \(path): \(error)")
        }
        guard rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw ConfigurationError("cannot write snapshot \(path): \(reason)")
        }
        // The rename is durable only once the directory is.
        let directoryFD = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryFD >= 0 {
            defer { close(directoryFD) }
            guard fsync(directoryFD) == 0 else {
                throw ConfigurationError("snapshot \(path) written, but syncing \(directory) failed: \(String(cString: strerror(errno)))")
            }
        }
        let elapsed = ContinuousClock.now - started
        statistics.seconds = elapsed.inSeconds
        return statistics
    }
}
