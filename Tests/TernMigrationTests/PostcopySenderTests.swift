import Foundation
import Glibc
import Testing
import TernMachine
import TernWire
@testable import TernMigration

/// The post-copy source's background push, against a destination played by the test.
struct PostcopySenderTests {
    /// Pages left scattered (as after many faults) still go in full frames, each page once.
    @Test func scatteredPagesGoInFullFramesEachOnce() throws {
        signal(SIGPIPE, SIG_IGN)
        let memory = try GuestMemory(size: 16 << 20)
        var needed = PageSet(pageCount: Int(memory.size) / PageRun.pageSize)
        let scattered = Array(stride(from: 7, to: 3000, by: 3))   // never two neighbours
        for page in scattered {
            needed.insert(page)
            try memory.store(UInt64(page) | 1, at: memory.address(ofPage: page))
        }
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let sender = PostcopySender(memory: memory, connection: nil, stream: FDStream(fd: fds[0]), needed: needed)
        let result = Thread.Result()
        let thread = Thread { result.set(Result { try sender.run() }) }
        thread.start()

        let destination = FDStream(fd: fds[1])
        var pagesPerFrame: [Int] = []
        var seen: [Int: Int] = [:]
        while true {
            let (header, payload) = try destination.readFrame()
            if header.type == .postcopyEnd { break }
            try #require(header.type == .pages)
            var offset = 0, pages = 0
            while offset < payload.count {
                let run = try PageRun(decodingHeader: Array(payload[offset..<offset + PageRun.headerSize]))
                offset += PageRun.headerSize
                let first = Int(try memory.fileOffset(of: run.address)) / PageRun.pageSize
                for page in first..<first + Int(run.pageCount) {
                    seen[page, default: 0] += 1
                    let word = payload[offset..<offset + 8].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
                    #expect(word == UInt64(page) | 1, "page \(page) carries its own contents")
                    offset += PageRun.pageSize
                }
                pages += Int(run.pageCount)
            }
            pagesPerFrame.append(pages)
        }
        try destination.writeFrame(.complete, payload: PostcopyStatistics().encoded)
        thread.join(timeout: 10)
        _ = try #require(result.get()).get()

        #expect(Set(seen.keys) == Set(scattered) && seen.values.allSatisfy { $0 == 1 }, "every needed page once, no other")
        #expect(pagesPerFrame.dropLast().allSatisfy { $0 == PostcopySender.pushFramePages },
                "frames are full although no two pages are neighbours: \(pagesPerFrame.prefix(8))")
    }
}

private extension Thread {
    /// A value handed from a thread to the test.
    final class Result: @unchecked Sendable {
        private let lock = NSLock()
        private var value: Swift.Result<PostcopyStatistics, any Error>?
        func set(_ v: Swift.Result<PostcopyStatistics, any Error>) { lock.withLock { value = v } }
        func get() -> Swift.Result<PostcopyStatistics, any Error>? { lock.withLock { value } }
    }

    func join(timeout: Double) {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while !isFinished && Date() < deadline { usleep(10_000) }
    }
}
