import Foundation
import Synchronization

/// Leader election on etcd for several controllers: the leader holds KEY (its name)
/// under a lease it keeps alive; when it stops, the lease expires after its TTL and
/// another controller's next campaign takes the key. Every write of the store is
/// fenced on the key holding this controller's name, so a leader that lost the key
/// without noticing cannot write.
public final class EtcdLeadership: Sendable {
    public let client: EtcdClient
    public let key: String
    public let name: String
    public let ttl: Int
    private let lease = Mutex<Int64?>(nil)
    private let leading = Atomic<Bool>(false)
    private let holder = Mutex<String?>(nil)

    public init(client: EtcdClient, key: String, name: String, ttl: Int = 3) {
        self.client = client
        self.key = key
        self.name = name
        self.ttl = ttl
    }

    /// Renews this controller's lease and tries for the key; whether it leads now.
    @discardableResult
    public func campaign() -> Bool {
        do {
            var current = lease.withLock { $0 }
            if let id = current, try !client.keepAlive(id) { current = nil }
            if current == nil {
                current = try client.grantLease(ttl: ttl)
            }
            lease.withLock { $0 = current }
            let outcome = try client.create(key, Data(name.utf8), lease: current!)
            let now = outcome.current.map { String(decoding: $0, as: UTF8.self) }
            holder.withLock { $0 = now }
            leading.store(now == name, ordering: .relaxed)
        } catch {
            leading.store(false, ordering: .relaxed)
            holder.withLock { $0 = nil }
        }
        return isLeader
    }

    public var isLeader: Bool { leading.load(ordering: .relaxed) }
    /// Who held the key at the last campaign.
    public var leader: String? { holder.withLock { $0 } }

    /// Gives the key up at once (a controller stopping cleanly), rather than after the TTL.
    public func resign() {
        guard let id = lease.withLock({ $0 }) else { return }
        try? client.revoke(id)
        lease.withLock { $0 = nil }
        leading.store(false, ordering: .relaxed)
    }
}
