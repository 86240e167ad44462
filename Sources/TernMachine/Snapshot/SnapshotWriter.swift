import Foundation
import Glibc
import TernWire

/// Writes a paused VM's state and memory to a snapshot file.
///
/// The file appears atomically: everything goes to a temporary file in the
/// same directory, which is synced and renamed over the target only when
/// complete, so a failed or interrupted write never leaves a half snapshot
/// (nor destroys an older one) at the path.
public enum SnapshotWriter {
    public static func write(state: MachineStateSnapshot, memory: GuestMemory, to path: String) throws -> SnapshotStatistics {
        let started = ContinuousClock.now
        let directory = (path as NSString).deletingLastPathComponent
        let temporary = (directory.isEmpty ? "." : directory) + "/.\((path as NSString).lastPathComponent).tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
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
            guard fsync(fd) == 0 else { throw FDStream.IOError(operation: "fsync \(temporary)", errno: errno) }
            statistics.fileBytes = UInt64(lseek(fd, 0, SEEK_CUR))
        } catch {
            unlink(temporary)
            throw ConfigurationError("cannot write snapshot \(path): \(error)")
        }
        guard rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw ConfigurationError("cannot write snapshot \(path): \(reason)")
        }
        let elapsed = ContinuousClock.now - started
        statistics.seconds = elapsed.inSeconds
        return statistics
    }
}
