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
            var stateBytes: UInt64 = 0
            while true {
                let header = try stream.readFrameHeader()
                guard header.type == .state else {
                    pendingHeader = header
                    break
                }
                guard sections.count < 1024 else { throw WireError.tooLarge("more than 1024 state sections") }
                // A VM's state is tens of KiB per vCPU: what a hostile file makes this process hold is capped before it is read.
                stateBytes += header.length
                guard stateBytes <= SnapshotFormat.maximumStateBytes else {
                    throw WireError.tooLarge("more than \(SnapshotFormat.maximumStateBytes >> 20) MiB of VM state")
                }
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
        let applier = PageRunApplier(memory: memory, delivery: .exactlyOnce)
        do {
            while true {
                guard let header = try pendingHeader ?? stream.readFrameHeader() as FrameHeader? else { break }
                pendingHeader = nil
                switch header.type {
                case .pages:
                    try applier.apply(header, from: stream)
                    frames += 1
                case .end:
                    let payload = try stream.readExactly(Int(header.length), what: "end frame")
                    guard Checksum.crc32c(payload) == header.payloadCRC else { throw WireError.checksumMismatch("end frame") }
                    let summary = try SnapshotFormat.EndSummary(decoding: payload)
                    statistics.dataPages = applier.dataPages
                    statistics.zeroPages = applier.zeroPages
                    guard summary == SnapshotFormat.EndSummary(frames: frames, dataPages: statistics.dataPages, zeroPages: statistics.zeroPages) else {
                        throw WireError.malformed("end frame totals \(summary) disagree with the file's contents")
                    }
                    guard applier.isComplete else {
                        throw WireError.malformed("\(applier.missingPages) pages of guest RAM are missing from the snapshot")
                    }
                    var extra: UInt8 = 0
                    guard read(stream.fd, &extra, 1) == 0 else { throw WireError.malformed("data after the end frame") }
                    statistics.fileBytes = UInt64(lseek(stream.fd, 0, SEEK_CUR))
                    let elapsed = ContinuousClock.now - started
                    statistics.seconds = elapsed.inSeconds
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

    /// Whether every page of the run has arrived before.
    func contains(_ run: PageRun) -> Bool {
        guard let first = try? memory.fileOffset(of: run.address, length: UInt64(run.byteCount)) / UInt64(PageRun.pageSize) else { return false }
        return (first..<first + UInt64(run.pageCount)).allSatisfy { bits[Int($0 / 64)] & (UInt64(1) << ($0 % 64)) != 0 }
    }

    /// Whether any page of the run has arrived before.
    func containsAny(_ run: PageRun) -> Bool {
        guard let first = try? memory.fileOffset(of: run.address, length: UInt64(run.byteCount)) / UInt64(PageRun.pageSize) else { return true }
        return (first..<first + UInt64(run.pageCount)).contains { bits[Int($0 / 64)] & (UInt64(1) << ($0 % 64)) != 0 }
    }

    /// Marks a run's pages; a page delivered twice is an error unless repeats are expected.
    mutating func mark(_ run: PageRun, allowRepeats: Bool = false) throws {
        let first = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount)) / UInt64(PageRun.pageSize)
        for page in first..<first + UInt64(run.pageCount) {
            let word = Int(page / 64), bit = UInt64(1) << (page % 64)
            if bits[word] & bit != 0 {
                guard allowRepeats else { throw WireError.malformed("page \(run.address) delivered twice") }
                continue
            }
            bits[word] |= bit
            covered += 1
        }
    }
}
