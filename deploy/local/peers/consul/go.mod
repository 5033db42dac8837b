// Build module for the real Consul agent used by syncworker's peer tests.
// syncworker/sandbox/peers/consul.py copies this file (and go.sum) into the peer
// cache and runs `go build -o <cache>/consul github.com/hashicorp/consul` there.
//
// v1.16.4 is the last MPL-2.0 release (1.16.5+ and 1.17+ are BSL: do not use).
// Its own go.mod replaces api, envoyextensions, proto-public, sdk and troubleshoot
// with local directories; a dependent module ignores those replaces, so the
// published tags that v1.16.4 names are required here instead (api v1.25.1,
// proto-public v0.4.1, sdk v0.15.0). envoyextensions v0.4.1 and troubleshoot
// v0.3.1 are also named by v1.16.4 and would come in through it; see NOTES.md.
module syncworker.local/peers/consul

go 1.24

// Copied from github.com/hashicorp/consul v1.16.4's go.mod.
exclude (
	github.com/hashicorp/go-msgpack v1.1.5 // has breaking changes and must be avoided
	github.com/hashicorp/go-msgpack v1.1.6 // contains retractions but same as v1.1.5
)

require (
	github.com/hashicorp/consul v1.16.4
	github.com/hashicorp/consul/api v1.25.1
	github.com/hashicorp/consul/proto-public v0.4.1
	github.com/hashicorp/consul/sdk v0.15.0
)

tool github.com/hashicorp/consul
