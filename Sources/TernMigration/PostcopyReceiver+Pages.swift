import CKVM
import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// Post-copy's pages: pushed or requested, checked, accepted once and placed atomically.
extension PostcopyReceiver {
    func receivePages(vmStartedNs: UInt64) throws {
        while true {
            let header: FrameHeader
            do { header = try source.readFrameHeader() } catch where Self.isConnectionLoss(error) {
                try awaitResume(after: error)
                continue
            }
            switch header.type {
            case .pages:
                do { try place(header, from: source, bounce: bounce) } catch where Self.isConnectionLoss(error) {
                    // A frame cut short is dropped whole: its pages are placed only after its CRC checks out.
                    try awaitResume(after: error)
                }
            case .postcopyEnd:
                _ = try source.readExactly(Int(header.length), what: "post-copy end")
                // The demand channel and the push streams end too (or ended with a dropped connection):
                // what they carried is placed first.
                if urgent != nil {
                    urgentDone.wait()
                    urgentDone.signal()
                }
                pushDone.wait()
                let missing = lock.withLock { expected.count }
                guard missing == 0 else { throw WireError.malformed("the source finished with \(missing) pages never sent") }
                finish(vmStartedNs: vmStartedNs)
                // The source's acknowledgement (or, if the connection drops first, its resume) follows.
            case .completeAck:
                guard isComplete else { throw WireError.malformed("a completion acknowledgement before memory was complete") }
                _ = try source.readExactly(Int(min(header.length, 64)), what: "completion acknowledgement")
                disconnect()
                return
            case .abort:
                let payload = try source.readExactly(Int(header.length), what: "abort")
                throw WireError.malformed("the source aborted: \(String(decoding: payload, as: UTF8.self))")
            default:
                throw WireError.malformed("unexpected \(header.type) frame during post-copy")
            }
        }
    }

    /// What a connection besides the control one carries in post-copy.
    enum SideConnection: String {
        /// Replies to page requests (the demand channel). Dropped, it cuts the control connection too, since
        /// replies it lost are owed again (after a resume, post-copy runs on the control connection alone).
        case demandChannel = "demand channel"
        /// Pushed pages (one of the pre-copy's extra streams). Dropped, it cuts the control connection
        /// too, so that the whole of post-copy waits for a resume rather than for the pages it would have carried.
        case pushStream = "push stream"
    }

    /// The pages frames of a demand channel or a push stream, until the source's `postcopyEnd` on it.
    func receivePages(on stream: FDStream, _ kind: SideConnection, bounce: UnsafeMutableRawBufferPointer) {
        var noTimeout = timeval(tv_sec: 0, tv_usec: 0)
        setsockopt(stream.fd, SOL_SOCKET, SO_RCVTIMEO, &noTimeout, socklen_t(MemoryLayout<timeval>.size))
        do {
            while true {
                let header = try stream.readFrameHeader()
                switch header.type {
                case .pages:
                    guard (header.flags & demandReplyFlag != 0) == (kind == .demandChannel) else {
                        throw WireError.malformed(kind == .demandChannel ? "a pushed page on the demand channel" : "a demand reply on a push stream")
                    }
                    try place(header, from: stream, bounce: bounce)
                case .postcopyEnd:
                    return
                default:
                    throw WireError.malformed("unexpected \(header.type) frame on the \(kind.rawValue)")
                }
            }
        } catch where Self.isConnectionLoss(error) {
            // Pages in flight on it (a damaged frame's, or replies a dropped connection lost) are owed again, and only
            // a resume (its reply lists what is missing) has them sent again: the control connection is cut too.
            var damaged = false
            if case WireError.checksumMismatch = error { damaged = true }
            if damaged {
                logger.warning("post-copy \(kind.rawValue): \(error); dropping the connections to resume")
            } else {
                logger.debug("post-copy \(kind.rawValue) closed: \(error)")
            }
            writeLock.withLock { if connected && completion == nil { shutdown(source.fd, Int32(SHUT_RDWR)) } }
        } catch {
            fail("\(error)")
        }
    }

    /// The fault hook damages one frame per process.
    static let corruptedOnce = Atomic<Bool>(false)

    /// Reads a whole pages frame, checks its CRC, and only then places its
    /// pages: a running vCPU must never see bytes that fail the check.
    func place(_ header: FrameHeader, from stream: FDStream, bounce: UnsafeMutableRawBufferPointer) throws {
        let demandReply = header.flags & demandReplyFlag != 0
        let length = Int(header.length)
        guard length <= bounce.count else { throw WireError.tooLarge("a post-copy pages frame of \(length) bytes") }
        let frame = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<length])
        try stream.readExactly(into: frame, what: "post-copy pages frame")
        if MigrationDestination.injectedFault == "corrupt-postcopy-frame", !stream.authenticatesPayloads, length > 0,
           !Self.corruptedOnce.exchange(true, ordering: .relaxed) {
            logger.warning("TERN_MIGRATION_FAULT=corrupt-postcopy-frame: damaging a pages frame as the wire might")
            frame[length - 1] ^= 0xFF
        }
        try stream.checkPayload(UnsafeRawBufferPointer(frame), of: header, what: "pages frame during post-copy")
        var offset = 0
        while offset < length {
            guard length - offset >= PageRun.headerSize else { throw WireError.malformed("pages frame ends inside a run header") }
            let run = try PageRun(decodingHeader: Array(UnsafeRawBufferPointer(rebasing: frame[offset..<offset + PageRun.headerSize])))
            offset += PageRun.headerSize
            guard run.kind != .delta else { throw WireError.malformed("a delta page during post-copy, where each page is sent once") }
            let fileOffset = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount))
            let firstPage = Int(fileOffset) / PageRun.pageSize
            if run.kind == .data && length - offset < run.byteCount { throw WireError.malformed("pages frame ends inside page data") }
            let firstCopies = try accept(run, firstPage: firstPage, demandReply: demandReply)
            let dataStart = offset
            if run.kind == .data { offset += run.byteCount }
            // Usually the whole run; without the second copies of pages already placed.
            for pages in firstCopies {
                let skipped = (pages.lowerBound - firstPage) * PageRun.pageSize
                let part = PageRun(address: run.address + UInt64(skipped), pageCount: UInt32(pages.count), kind: run.kind)
                let data = run.kind == .data ? UnsafeRawBufferPointer(rebasing: frame[dataStart + skipped..<dataStart + skipped + part.byteCount]) : nil
                try place(part, firstPage: pages.lowerBound, fileOffset: fileOffset + UInt64(skipped), data: data)
                if minorFaults { lock.withLock { for page in pages { placing.remove(page) } } }
            }
        }
    }

    /// Places a run of pages just accepted: zero runs by UFFDIO_ZEROPAGE, data by UFFDIO_COPY
    /// (minor-fault mode: written into the file, then mapped by UFFDIO_CONTINUE).
    func place(_ run: PageRun, firstPage: Int, fileOffset: UInt64, data: UnsafeRawBufferPointer?) throws {
        let target = memory.mapping.base + Int(fileOffset)
        switch run.kind {
        case .zero:
            if minorFaults {
                // A run may be longer than the zero buffer (runs are bounded by the region only).
                var done = 0
                while done < run.byteCount {
                    let piece = min(zeros.count, run.byteCount - done)
                    try write(UnsafeRawBufferPointer(rebasing: zeros[0..<piece]), at: fileOffset + UInt64(done))
                    done += piece
                }
            }
            guard try (minorFaults ? uffd.continueMapping(target, length: run.byteCount) : uffd.zero(target, length: run.byteCount)) == .placed else {
                throw WireError.malformed("page run at \(run.address) is already present")
            }
            if verifying {
                var sum: UInt64 = 0
                for page in firstPage..<firstPage + Int(run.pageCount) { sum &+= MemoryDigest.contribution(page: UInt64(page), crc: MemoryDigest.zeroPageCRC) }
                lock.withLock { digest! &+= sum }
            }
        case .delta:
            throw WireError.malformed("a delta page during post-copy")
        case .data:
            let chunk = data!
            // In pieces: the kernel wakes a faulting vCPU only once the whole range is placed, and placing
            // 64 fresh pages takes most of a millisecond here (first touch of host memory).
            for piece in stride(from: 0, to: run.byteCount, by: Self.placementPieceBytes) {
                let part = UnsafeRawBufferPointer(rebasing: chunk[piece..<min(run.byteCount, piece + Self.placementPieceBytes)])
                if minorFaults { try write(part, at: fileOffset + UInt64(piece)) }
                guard try (minorFaults ? uffd.continueMapping(target + piece, length: part.count)
                                       : uffd.copy(to: target + piece, from: part.baseAddress!, length: part.count)) == .placed else {
                    throw WireError.malformed("page run at \(run.address) is already present")
                }
            }
            if verifying {
                let sum = MemoryDigest.contribution(ofPages: chunk, first: firstPage)
                lock.withLock { digest! &+= sum }
            }
        }
    }

    /// Writes a run's contents into the memfd (minor-fault mode), where no vCPU can see them before they are mapped.
    func write(_ bytes: UnsafeRawBufferPointer, at fileOffset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(memory.file.rawValue, bytes.baseAddress! + done, bytes.count - done, off_t(fileOffset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            // A local failure, not a lost connection: it must not send post-copy into waiting for a resume.
            guard n > 0 else { throw SystemError("writing guest memory", errno: errno) }
            done += n
        }
    }

    /// Checks that every page of a run is still expected (and, for a demand
    /// reply, was requested), marks it arrived, and returns the pages to place:
    /// the whole run, less the second copies of requested pages already here.
    func accept(_ run: PageRun, firstPage: Int, demandReply: Bool) throws -> [Range<Int>] {
        lock.lock()
        defer { lock.unlock() }
        // After a failure no page is placed: a vCPU woken by one would run while the VM counts as paused.
        guard !finished.load(ordering: .relaxed) else { throw WireError.malformed("a page after post-copy ended") }
        // Read under the lock: request times are too, so `now` is never earlier than one of them.
        let now = Clocks.monotonicNs()
        let pages = firstPage..<firstPage + Int(run.pageCount)
        for page in pages {
            if demandReply && !requested.contains(page) {
                throw WireError.malformed("a reply for page \(memory.address(ofPage: page)), which was never requested")
            }
            guard expected.contains(page) || secondCopyAllowed.contains(page) else {
                throw WireError.malformed("page \(memory.address(ofPage: page)) was sent twice or was never needed")
            }
        }
        if !waitingThreads.isEmpty { waitingThreads = waitingThreads.filter { !pages.contains($0.value) } }
        var firstCopies: [Range<Int>] = []
        for page in pages {
            guard expected.contains(page) else {
                secondCopyAllowed.remove(page)
                statistics.secondCopiesDropped += 1
                continue
            }
            expected.remove(page)
            if minorFaults { placing.insert(page) }
            if requested.contains(page) { secondCopyAllowed.insert(page) }
            if demandReply { statistics.pagesPulled += 1 } else { statistics.pagesPushed += 1 }
            if let asked = requestTimes.removeValue(forKey: page) { latencies.append(Clocks.milliseconds(from: asked, to: now)) }
            if let last = firstCopies.last, last.upperBound == page {
                firstCopies[firstCopies.count - 1] = last.lowerBound..<page + 1
            } else {
                firstCopies.append(page..<page + 1)
            }
        }
        return firstCopies
    }

    /// Sends `complete`: the first time with the statistics, after a resume the same report again.
    func finish(vmStartedNs: UInt64) {
        if var again = writeLock.withLock({ completion }) {
            again.reconnections = lock.withLock { statistics.reconnections }
            writeLock.withLock { _ = try? source.writeFrame(.complete, payload: again.encoded) }
            logger.info("post-copy: `complete` sent again after the resume")
            return
        }
        guard !finished.exchange(true, ordering: .relaxed) else { return } // failed meanwhile: no `complete` after an abort
        machine.memoryIncomplete = false
        releaseFaults()
        let report: PostcopyStatistics = lock.withLock {
            var result = statistics
            let sorted = latencies.sorted()
            if !sorted.isEmpty {
                result.faultLatencyP50Ms = sorted[sorted.count / 2]
                result.faultLatencyP99Ms = sorted[min(sorted.count - 1, Int(Double(sorted.count) * 0.99))]
                result.faultLatencyMaxMs = sorted.last!
            }
            result.memoryCompleteAfterMs = Clocks.milliseconds(from: vmStartedNs, to: Clocks.monotonicNs())
            result.memoryDigest = digest.map { String(format: "%016llx", $0) }
            return result
        }
        writeLock.withLock {
            completion = report
            if MigrationDestination.injectedFault == "lose-complete" {
                // Fault injection (tests): the connection drops just as `complete` would have gone.
                logger.warning("TERN_MIGRATION_FAULT=lose-complete: dropping the connection instead of sending `complete`")
                connected = false
                shutdown(source.fd, Int32(SHUT_RDWR))
            } else {
                _ = try? source.writeFrame(.complete, payload: report.encoded)
            }
        }
        logger.info("post-copy complete: \(report.pagesPushed) pages pushed, \(report.pagesPulled) pulled, \(report.faults) faults, fault latency p50 \(String(format: "%.3f", report.faultLatencyP50Ms)) ms p99 \(String(format: "%.3f", report.faultLatencyP99Ms)) ms; all memory here after \(String(format: "%.0f", report.memoryCompleteAfterMs)) ms")
    }
}
