import Foundation
import Logging
import TernCluster

/// Host liveness through etcd leases: each agent keeps PREFIX/alive/NAME under a lease
/// of its own (`EtcdHeartbeat`), and the controller counts a host alive while that key
/// exists. An agent that stops renewing loses the key after the lease's TTL.
public struct EtcdHostLiveness: HostLiveness {
    public let client: EtcdClient
    public let prefix: String

    public init(client: EtcdClient, prefix: String = "/tern/") {
        self.client = client
        self.prefix = prefix.hasSuffix("/") ? prefix : prefix + "/"
    }

    public func liveHosts() throws -> Set<String> {
        Set(try client.range(prefix: prefix + "alive/").map { String($0.key.dropFirst(prefix.count + "alive/".count)) })
    }
}

/// The agent's side: renews its lease every second on a thread of its own, and puts its
/// key again under a new lease when the old one was lost (etcd was away longer than the TTL).
public final class EtcdHeartbeat: Sendable {
    public let client: EtcdClient
    public let key: String
    public let ttl: Int

    public init(client: EtcdClient, host: String, prefix: String = "/tern/", ttl: Int = 5) {
        self.client = client
        key = (prefix.hasSuffix("/") ? prefix : prefix + "/") + "alive/" + host
        self.ttl = ttl
    }

    public func start(logger: Logger) {
        let thread = Thread { [self] in
            var lease: Int64?
            var reported = false
            while true {
                do {
                    if let id = lease, try client.keepAlive(id) {
                        // Renewed.
                    } else {
                        let id = try client.grantLease(ttl: ttl)
                        try client.put(key, Data("{}".utf8), lease: id)
                        lease = id
                    }
                    if reported { logger.notice("etcd reachable again: liveness lease renewed") }
                    reported = false
                } catch {
                    if !reported { logger.warning("cannot renew the liveness lease", metadata: ["error": "\(error)"]) }
                    reported = true
                }
                sleep(1)
            }
        }
        thread.start()
    }
}
