import CKVM
import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// Post-copy's faults: a vCPU (or KVM for it) touches a page not here yet; it is requested from the source.
extension PostcopyReceiver {
    func serveFaults() {
        let base = UInt64(UInt(bitPattern: memory.mapping.base))
        while !faultsReleased.load(ordering: .relaxed) {
            let faults: [Userfaultfd.Fault]
            do { faults = try uffd.waitForFaults(timeoutMs: 100) } catch {
                fail("\(error)")
                return
            }
            // After a failure nothing is asked for: the pages will not come, their vCPUs stay waiting.
            let failed = finished.load(ordering: .relaxed)
            var toRequest: [UInt64] = []
            var toZero: [Int] = []
            var toMapAgain: [Int] = []
            let now = Clocks.monotonicNs()
            lock.withLock {
                for fault in faults {
                    let page = Int((fault.address - base) / UInt64(PageRun.pageSize))
                    guard page < expected.pageCount else { continue }
                    statistics.faults += 1
                    if !needed.contains(page) {
                        toZero.append(page)        // never written at the source: zero, no need to ask
                        continue
                    }
                    guard expected.contains(page) else {
                        // A page accepted a moment ago is being placed, which wakes this vCPU: nothing to ask for.
                        // One placed already that faults again lost its mapping, not its contents (minor faults
                        // only: the file keeps the page when the kernel drops a mapping, by reclaim or khugepaged).
                        if minorFaults && !placing.contains(page) { toMapAgain.append(page) }
                        continue
                    }
                    waitingThreads[fault.threadID] = page
                    if !failed && !requested.contains(page) {
                        requested.insert(page)
                        requestTimes[page] = now
                        toRequest.append(UInt64(page))
                    }
                }
                statistics.requests += UInt64(toRequest.count)
            }
            for page in toZero {
                do {
                    // Minor faults: a page not needed is right in the file already (zero or sent before); it only needs
                    // mapping, unless it is a hole, which is allocated (zero, and never written by anyone) first.
                    let target = memory.mapping.base + page * PageRun.pageSize
                    var placement = minorFaults ? try uffd.continueMapping(target, length: PageRun.pageSize)
                                                : try uffd.zero(target, length: PageRun.pageSize)
                    if placement == .notInFile {
                        try allocate(page: page)
                        placement = try uffd.continueMapping(target, length: PageRun.pageSize)
                    }
                    if placement == .placed {
                        lock.withLock { statistics.pagesZeroFilledLocally += 1 }
                    }
                } catch {
                    fail("cannot zero-fill page \(memory.address(ofPage: page)): \(error)")
                    return
                }
            }
            for page in toMapAgain {
                do {
                    _ = try uffd.continueMapping(memory.mapping.base + page * PageRun.pageSize, length: PageRun.pageSize)
                } catch {
                    fail("cannot map page \(memory.address(ofPage: page)) again: \(error)")
                    return
                }
            }
            if !toRequest.isEmpty {
                do {
                    try sendRequests(toRequest)
                } catch {
                    // The vCPUs keep waiting for these pages; they are asked for again after a resume
                    // (the failed connection is already cut, so the pages thread notices).
                    guard recovery != nil else {
                        fail("cannot request pages from the source: \(error)")
                        return
                    }
                }
            }
        }
    }

    /// The runs of whole 2 MiB blocks (in pages, within guest RAM) that hold at least one of `pages`.
    static func blocks(holding pages: PageSet) -> [(first: Int, count: Int)] {
        var blocks: [(first: Int, count: Int)] = []
        var page = pages.next(from: 0)
        while let first = page {
            let block = first / blockPages * blockPages
            let end = min(block + blockPages, pages.pageCount)
            if let last = blocks.last, last.first + last.count == block {
                blocks[blocks.count - 1].count = end - last.first
            } else {
                blocks.append((block, end - block))
            }
            page = end < pages.pageCount ? pages.next(from: end) : nil
        }
        return blocks
    }

    /// Maps again, while the VM runs, the pages not needed in the blocks unmapped at the switch (their
    /// contents are in the file already), so that the guest does not fault on each of them. A vCPU that
    /// gets there first takes the fault path's local mapping instead; either way the other finds it mapped.
    func remapUnneededPages() {
        var mapped = 0
        let started = Clocks.monotonicNs()
        defer { logger.debug("post-copy: \(mapped) pages not needed mapped again in \(Int(Clocks.milliseconds(from: started, to: Clocks.monotonicNs()))) ms") }
        for (blockStart, blockCount) in unmappedBlocks {
            var page = blockStart
            let end = blockStart + blockCount
            while page < end {
                guard !faultsReleased.load(ordering: .relaxed), !finished.load(ordering: .relaxed) else { return }
                if needed.contains(page) {
                    page += 1
                    continue
                }
                var runEnd = page + 1
                while runEnd < end && !needed.contains(runEnd) { runEnd += 1 }
                do {
                    switch try uffd.continueMapping(memory.mapping.base + page * PageRun.pageSize, length: (runEnd - page) * PageRun.pageSize) {
                    case .placed:
                        mapped += runEnd - page
                    case .notInFile:
                        // Holes (pages no one wrote) are left to the fault path; the file's data around them is mapped.
                        try memory.forEachExtent(in: page..<runEnd) { first, count, isHole in
                            if !isHole { mapped += try mapPageByPage(first..<first + count) }
                        }
                    case .alreadyPresent:
                        // Part of the run is mapped already (a fault got there first).
                        mapped += try mapPageByPage(page..<runEnd)
                    }
                } catch {
                    // Not fatal: a vCPU touching these pages has them mapped by the fault path.
                    logger.debug("post-copy: stopped mapping unneeded pages again: \(error)")
                    return
                }
                page = runEnd
            }
        }
    }

    /// Maps each page of `pages` that is not mapped yet; returns how many it mapped.
    private func mapPageByPage(_ pages: Range<Int>) throws(SystemError) -> Int {
        var mapped = 0
        for page in pages where try uffd.continueMapping(memory.mapping.base + page * PageRun.pageSize, length: PageRun.pageSize) == .placed {
            mapped += 1
        }
        return mapped
    }

    /// Allocates a hole in the file (a zero page, within a huge page where the kernel can), so that it can be mapped.
    func allocate(page: Int) throws(SystemError) {
        while ckvm_allocate_range(memory.file.rawValue, Int64(page * PageRun.pageSize), Int64(PageRun.pageSize)) != 0 {
            guard errno == EINTR else { throw SystemError("allocating a zero page of guest RAM", errno: errno) }
        }
    }

    /// Sends page requests (in pieces a request frame can hold); a no-op while disconnected.
    func sendRequests(_ pages: [UInt64]) throws {
        try writeLock.withLock { try sendRequestsLocked(pages) }
    }

    /// `sendRequests` with `writeLock` held. A failed write marks this very
    /// connection lost (never one adopted since) and cuts it.
    func sendRequestsLocked(_ pages: [UInt64]) throws {
        guard connected else { return }
        do {
            for start in stride(from: 0, to: pages.count, by: PageRequest.maximumPages) {
                let request = PageRequest(pages: Array(pages[start..<min(pages.count, start + PageRequest.maximumPages)]))
                try source.writeFrame(.pageRequest, payload: request.encoded)
            }
        } catch {
            connected = false
            shutdown(source.fd, Int32(SHUT_RDWR))
            throw error
        }
    }

    /// Whether all memory is here and `complete` was sent (or lost with the connection).
    var isComplete: Bool { writeLock.withLock { completion != nil } }

    /// Marks the connection lost and cuts it, so the pages thread notices at once.
    func disconnect() {
        writeLock.withLock {
            connected = false
            shutdown(source.fd, Int32(SHUT_RDWR))
        }
        // The demand channel goes with it: after a resume everything comes on the new connection.
        if let urgent { shutdown(urgent.rawValue, Int32(SHUT_RDWR)) }
        for connection in pushConnections { shutdown(connection.rawValue, Int32(SHUT_RDWR)) }
    }
}
