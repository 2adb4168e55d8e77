-- publish: announce an event of one session. KEYS[1] is the session's head key, only
-- so that a Cluster runs this on the node that runs the session's other scripts: the
-- events of one session then reach subscribers in the order they happened.
-- ARGV[1] channel, [2] payload.  Reply: number of receivers on this node.
return redis.call('PUBLISH', ARGV[1], ARGV[2])
