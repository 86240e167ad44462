import CKVM
import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// A dropped post-copy connection: vCPUs wait, this side listens again for the source's `--resume`.
extension PostcopyReceiver {
    static let resumeOpeningSeconds = 2

    /// Whether an error means the connection is gone or damaged (then a resume can repair it), not that
    /// the source misbehaved. A frame that fails its CRC was damaged on the way: it is dropped whole before
    /// any of its pages is placed (`place` checks first), the stream it came on can no longer be trusted,
    /// and its pages are still owed, so they go again after the resume, as those of a cut frame do.
    static func isConnectionLoss(_ error: any Error) -> Bool {
        if Connection.broke(error) { return true }
        if case WireError.truncated = error { return true }
        if case WireError.checksumMismatch = error { return true }
        return false
    }

    /// Waits on the incoming address for the source to come back with the
    /// migration's token, and switches to the new connection.
    func awaitResume(after error: any Error) throws {
        guard let endpoint = recovery else { throw error }
        disconnect()
        let waiting = lock.withLock { expected.count }
        if isComplete {
            logger.warning("post-copy connection lost (\(error)) before the source confirmed it had `complete`; all memory is here. Listening on \(endpoint) for `tern migrate --resume`, for up to \(Int(Self.completedResumeWaitSeconds)) s")
        } else {
            logger.warning("post-copy connection lost (\(error)); \(waiting) pages still at the source, vCPUs that touch them wait. Listening on \(endpoint) for `tern migrate --resume`")
        }
        let listener = try listenAgain(on: endpoint)
        defer { if case .unix(let path) = endpoint { unlink(path) } }
        let waitStarted = Date()
        while true {
            if finished.load(ordering: .relaxed) {
                // Failed meanwhile: nothing to resume. Complete: wait a while for a source that missed it.
                guard isComplete else { throw error }
                if Date().timeIntervalSince(waitStarted) >= Self.completedResumeWaitSeconds {
                    logger.warning("no resume came within \(Int(Self.completedResumeWaitSeconds)) s; the VM runs here with all its memory")
                    throw error
                }
            }
            let socket: FileDescriptor
            do { socket = try Endpoint.accept(listener, timeoutSeconds: 1) } catch { continue }
            let candidate: Connection
            do {
                candidate = try security.establish(socket)
            } catch {
                logger.warning("refused a connection while waiting for the resume: \(error)")
                continue
            }
            do {
                try adopt(candidate)
                return
            } catch {
                // A stranger or a stale source: turned away, the wait goes on.
                logger.warning("refused a connection while waiting for the resume: \(error)")
                try? candidate.stream.writeFrame(.abort, payload: Array("\(error)".utf8))
            }
        }
    }

    /// The incoming address may be held for a moment by the socket just closed; retry for a while.
    func listenAgain(on endpoint: Endpoint) throws -> FileDescriptor {
        var attempts = 0
        while true {
            do { return try endpoint.listen() } catch {
                attempts += 1
                if attempts >= 50 { throw error }
                if case .unix(let path) = endpoint { unlink(path) }
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
    }

    /// Checks the resume, tells the source what is still missing, and re-asks for what vCPUs wait on.
    func adopt(_ candidate: Connection) throws {
        // A source sends its resume at once: a peer that stays silent must not hold up the real one for long.
        let payload = try readOpeningFrame(of: candidate, type: .postcopyResume, within: Self.resumeOpeningSeconds,
                                           otherwise: "expected a post-copy resume")
        let stream = candidate.stream
        guard try PostcopyResume(decoding: payload).token == token else {
            throw MigrationDestination.Refusal("a resume for another migration (wrong token)")
        }
        setTimeouts(candidate.rawValue, seconds: MigrationSource.replyTimeoutSeconds)
        var size: Int32 = 256 << 10
        setsockopt(candidate.rawValue, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        // The demand channel's and the push streams' threads have stopped (it was cut with the connection): no frame of the old
        // connection can be placed after the list of pages still expected is taken.
        if urgent != nil {
            urgentDone.wait()
            urgentDone.signal()
        }
        pushDone.wait()
        // Under one writeLock: a fault noted meanwhile is either in this list or sent on the new connection.
        var stillCount = 0, waitedCount = 0
        try writeLock.withLock {
            let (stillExpected, waitedOn): (PageSet, [UInt64]) = lock.withLock {
                var waited: [UInt64] = []
                var page = 0
                while page < requested.pageCount, let next = requested.next(from: page) {
                    if expected.contains(next) { waited.append(UInt64(next)) }
                    page = next + 1
                }
                statistics.reconnections += 1
                return (expected, waited)
            }
            try stream.writeFrame(.postcopyResumeReply, payload: PostcopyResumeReply(expected: stillExpected).encoded)
            source = stream
            connection = candidate
            connected = true
            try sendRequestsLocked(waitedOn)
            stillCount = stillExpected.count
            waitedCount = waitedOn.count
        }
        logger.info("post-copy resumed: \(stillCount) pages to come, \(waitedCount) of them waited on")
    }
}
