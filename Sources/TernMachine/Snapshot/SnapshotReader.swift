import Foundation
import Glibc
import TernWire

/// Reads a snapshot file in two steps: `open` checks the header and decodes
/// the state sections (so the caller can build a matching VM), then
/// `loadMemory` streams the page runs straight into guest memory.
///
/// Nothing is trusted: every frame's CRC is checked, every run must lie in
/// guest RAM, every page must be covered exactly once, and the end frame's
/// totals must agree. Any failure is an error before the VM ever runs.
public final class SnapshotReader {
    public let path: String
    public let state: MachineStateSnapshot
    private let file: FileHandle
    private let stream: FDStream
    /// The first frame after the state sections, already read.
    private var pendingHeader: FrameHeader?
    private var frames: UInt64
    private let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)

    deinit { bounce.deallocate() }

    public init(path: String) throws {
        self.path = path
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw ConfigurationError("cannot read snapshot \(path): \(String(cString: strerror(errno)))")
        }
        file = handle
        stream = FDStream(fd: handle.fileDescriptor)
        do {
            try SnapshotFormat.checkHeader(stream.readExactly(SnapshotFormat.headerSize, what: "snapshot header"))
            var sections: [StateSection] = []
            var frames: UInt64 = 0
            while true {
                let header = try stream.readFrameHeader()
                guard header.type == .state else {
                    pendingHeader = header
                    break
                }
                guard sections.count < 1024 else { throw WireError.tooLarge("more than 1024 state sections") }
                let payload = try stream.readExactly(Int(header.length), what: "state frame")
                guard Checksum.crc32c(payload) == header.payloadCRC else { throw WireError.checksumMismatch("state frame \(frames)") }
                sections.append(try StateSection(decoding: payload))
                frames += 1
            }
            self.frames = frames
            state = try MachineStateSnapshot(sections: sections)
        } catch let error as ConfigurationError {
            throw error
        } catch {
            throw ConfigurationError("snapshot \(path) is unusable: \(error)")
        }
    }

    /// Streams the pages into `memory` (a fresh, all-zero VM memory of the
    /// snapshot's size). Zero runs are skipped: the memory is zero already.
    public func loadMemory(into memory: GuestMemory) throws -> SnapshotStatistics {
        let started = ContinuousClock.now
        var statistics = SnapshotStatistics()
        var coverage = PageCoverage(memory: memory)
        do {
            while true {
                guard let header = try pendingHeader ?? stream.readFrameHeader() as FrameHeader? else { break }
                pendingHeader = nil
                switch header.type {
                case .pages:
                    try readPagesFrame(header, into: memory, coverage: &coverage, statistics: &statistics)
                    frames += 1
                case .end:
                    let payload = try stream.readExactly(Int(header.length), what: "end frame")
                    guard Checksum.crc32c(payload) == header.payloadCRC else { throw WireError.checksumMismatch("end frame") }
                    let summary = try SnapshotFormat.EndSummary(decoding: payload)
                    guard summary == SnapshotFormat.EndSummary(frames: frames, dataPages: statistics.dataPages, zeroPages: statistics.zeroPages) else {
                        throw WireError.malformed("end frame totals \(summary) disagree with the file's contents")
                    }
                    guard coverage.isComplete else {
                        throw WireError.malformed("\(coverage.missing) pages of guest RAM are missing from the snapshot")
                    }
                    var extra: UInt8 = 0
                    guard read(stream.fd, &extra, 1) == 0 else { throw WireError.malformed("data after the end frame") }
                    statistics.fileBytes = UInt64(lseek(stream.fd, 0, SEEK_CUR))
                    let elapsed = ContinuousClock.now - started
                    statistics.seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                    return statistics
                default:
                    throw WireError.malformed("unexpected \(header.type) frame in the memory part of a snapshot")
                }
            }
        } catch {
            throw ConfigurationError("snapshot \(path) is unusable: \(error)")
        }
        throw ConfigurationError("snapshot \(path) is unusable: no end frame")
    }

    private func readPagesFrame(_ header: FrameHeader, into memory: GuestMemory, coverage: inout PageCoverage,
                                statistics: inout SnapshotStatistics) throws {
        var remaining = Int(header.length)
        var crc: UInt32 = 0
        while remaining > 0 {
            guard remaining >= PageRun.headerSize else { throw WireError.malformed("pages frame ends inside a run header") }
            let runHeader = try stream.readExactly(PageRun.headerSize, what: "page run header")
            crc = Checksum.crc32c(runHeader, seed: crc)
            remaining -= PageRun.headerSize
            let run = try PageRun(decodingHeader: runHeader)
            guard memory.region(containing: run.address, length: UInt64(run.byteCount)) != nil else {
                throw WireError.malformed("page run \(run.address)+\(run.pageCount) pages lies outside guest RAM")
            }
            try coverage.mark(run)
            switch run.kind {
            case .zero:
                statistics.zeroPages += UInt64(run.pageCount)
            case .data:
                guard remaining >= run.byteCount else { throw WireError.malformed("pages frame ends inside page data") }
                crc = try copyIntoMemory(run, memory: memory, crc: crc)
                remaining -= run.byteCount
                statistics.dataPages += UInt64(run.pageCount)
            }
        }
        guard crc == header.payloadCRC else { throw WireError.checksumMismatch("pages frame \(frames)") }
    }

    /// Moves a data run from the file into guest memory through a bounce
    /// buffer and the memfd (pwrite), not through the VMM's mapping: touching
    /// the mapping would fault its page tables in page by page, which costs
    /// more than the copy itself (and the guest faults them in as it needs them).
    private func copyIntoMemory(_ run: PageRun, memory: GuestMemory, crc: UInt32) throws -> UInt32 {
        var crc = crc
        var fileOffset = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount))
        var left = run.byteCount
        while left > 0 {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<min(left, bounce.count)])
            try stream.readExactly(into: chunk, what: "page data")
            crc = Checksum.crc32c(UnsafeRawBufferPointer(chunk), seed: crc)
            var written = 0
            while written < chunk.count {
                let n = pwrite(memory.file.rawValue, chunk.baseAddress! + written, chunk.count - written, off_t(fileOffset) + off_t(written))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw FDStream.IOError(operation: "writing guest memory", errno: errno) }
                written += n
            }
            fileOffset += UInt64(chunk.count)
            left -= chunk.count
        }
        return crc
    }
}

/// One bit per page of guest RAM: which pages a stream has delivered.
struct PageCoverage {
    private var bits: [UInt64]
    private let memory: GuestMemory
    private(set) var covered: UInt64 = 0
    let total: UInt64

    init(memory: GuestMemory) {
        self.memory = memory
        total = memory.size / UInt64(PageRun.pageSize)
        bits = [UInt64](repeating: 0, count: Int((total + 63) / 64))
    }

    var isComplete: Bool { covered == total }
    var missing: UInt64 { total - covered }

    /// Marks a run's pages; a page delivered twice is an error.
    mutating func mark(_ run: PageRun) throws {
        let first = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount)) / UInt64(PageRun.pageSize)
        for page in first..<first + UInt64(run.pageCount) {
            let word = Int(page / 64), bit = UInt64(1) << (page % 64)
            guard bits[word] & bit == 0 else { throw WireError.malformed("page \(run.address) delivered twice") }
            bits[word] |= bit
        }
        covered += UInt64(run.pageCount)
    }
}
