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
            var batch = PageFrameBatch(memory: memory)
            try MemoryScanner(memory: memory).forEachRun { run in
                if run.kind == .data { statistics.dataPages += UInt64(run.pageCount) } else { statistics.zeroPages += UInt64(run.pageCount) }
                if batch.wouldOverflow(run) {
                    try batch.flush(to: stream)
                    frames += 1
                }
                batch.append(run)
            }
            if !batch.isEmpty {
                try batch.flush(to: stream)
                frames += 1
            }
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
        statistics.seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return statistics
    }
}

/// Page runs gathered into one `pages` frame: run headers as small arrays,
/// page bytes referenced straight from guest memory (written with writev,
/// never copied).
public struct PageFrameBatch {
    let memory: GuestMemory
    public private(set) var runs: [PageRun] = []
    public private(set) var dataPages = 0

    /// Bytes the frame will occupy on the wire.
    public var frameBytes: Int { FrameHeader.size + runs.reduce(0) { $0 + $1.payloadSize } }

    public init(memory: GuestMemory) { self.memory = memory }

    public var isEmpty: Bool { runs.isEmpty }

    public func wouldOverflow(_ run: PageRun) -> Bool {
        !runs.isEmpty && (dataPages + (run.kind == .data ? Int(run.pageCount) : 0) > SnapshotFormat.framePageBudget || runs.count >= 4096)
    }

    public mutating func append(_ run: PageRun) {
        runs.append(run)
        if run.kind == .data { dataPages += Int(run.pageCount) }
    }

    /// Page bytes a staging buffer must hold for one frame.
    public static let stagingCapacity = SnapshotFormat.framePageBudget * PageRun.pageSize

    /// Writes the frame. With a staging buffer (at least `stagingCapacity`),
    /// page bytes are copied first and the frame is checksummed and sent from
    /// the copy: a running guest may change a page between the checksum and
    /// the send, and the copy is what both agree on (the dirty log catches
    /// the change for a later round). Without one, pages go straight from
    /// guest memory, which is only sound while the VM is paused.
    public mutating func flush(to stream: FDStream, staging: UnsafeMutableRawBufferPointer? = nil) throws {
        // All run headers in one buffer that lives until the frame is written.
        let headers = UnsafeMutableRawBufferPointer.allocate(byteCount: runs.count * PageRun.headerSize, alignment: 8)
        defer { headers.deallocate() }
        var pieces: [UnsafeRawBufferPointer] = []
        pieces.reserveCapacity(runs.count * 2)
        var stagedBytes = 0
        if let staging { precondition(staging.count >= dataPages * PageRun.pageSize, "staging buffer smaller than a frame") }
        for (index, run) in runs.enumerated() {
            let slot = UnsafeMutableRawBufferPointer(rebasing: headers[index * PageRun.headerSize..<(index + 1) * PageRun.headerSize])
            slot.copyBytes(from: run.encodedHeader)
            pieces.append(UnsafeRawBufferPointer(slot))
            if run.kind == .data {
                let pointer = try memory.hostPointer(run.address, length: UInt64(run.byteCount))
                if let staging {
                    let copy = staging.baseAddress! + stagedBytes
                    copy.copyMemory(from: pointer, byteCount: run.byteCount)
                    stagedBytes += run.byteCount
                    pieces.append(UnsafeRawBufferPointer(start: copy, count: run.byteCount))
                } else {
                    pieces.append(UnsafeRawBufferPointer(start: pointer, count: run.byteCount))
                }
            }
        }
        try stream.writeFrame(.pages, payload: pieces)
        runs.removeAll(keepingCapacity: true)
        dataPages = 0
    }
}
