import Foundation

/// The bodies of the controller's API (docs/cluster-api.yaml) that are not records themselves.
public enum ControllerAPI {
    /// A host as `tern cluster hosts` shows it: its record and the controller's last look at its agent.
    public struct HostView: Codable, Sendable {
        public var name: String
        public var address: String
        public var draining: Bool
        public var reachable: Bool
        public var error: String?
        /// With etcd: whether the host's liveness lease is alive.
        public var leaseAlive: Bool?
        public var memoryCapacityMib: UInt64?
        public var memoryFreeMib: UInt64?
        public var vms: Int?
        public var seenAt: Date

        public init(name: String, address: String, draining: Bool, reachable: Bool, error: String?, leaseAlive: Bool? = nil,
                    memoryCapacityMib: UInt64?, memoryFreeMib: UInt64?, vms: Int?, seenAt: Date) {
            self.leaseAlive = leaseAlive
            self.name = name
            self.address = address
            self.draining = draining
            self.reachable = reachable
            self.error = error
            self.memoryCapacityMib = memoryCapacityMib
            self.memoryFreeMib = memoryFreeMib
            self.vms = vms
            self.seenAt = seenAt
        }
    }

    /// GET /v1/controller: which controller answers, where it keeps the state, who leads.
    public struct ControllerView: Codable, Sendable {
        public var name: String
        public var store: String
        public var leading: Bool
        public var leader: String?
        public var storeError: String?
        public init(name: String, store: String, leading: Bool, leader: String?, storeError: String?) {
            self.name = name
            self.store = store
            self.leading = leading
            self.leader = leader
            self.storeError = storeError
        }
    }

    /// A VM and the host that reports it.
    public struct PlacedVM: Codable, Sendable {
        public var host: String
        public var vm: VMStatus
        public init(host: String, vm: VMStatus) {
            self.host = host
            self.vm = vm
        }
    }

    public struct AddHost: Codable, Sendable {
        public var name: String
        public var address: String
        public init(name: String, address: String) {
            self.name = name
            self.address = address
        }
    }

    public struct CreateVM: Codable, Sendable {
        public var host: String
        public var spec: VMSpec
        public init(host: String, spec: VMSpec) {
            self.host = host
            self.spec = spec
        }
    }

    public struct Migrate: Codable, Sendable {
        public var vm: String
        public var to: String
        public init(vm: String, to: String) {
            self.vm = vm
            self.to = to
        }
    }

    public struct Evacuate: Codable, Sendable {
        public var host: String
        public init(host: String) { self.host = host }
    }
}
