-- SLED's rules for VerneMQ that vmq_acl cannot express (vmq_diversity; see broker/vernemq.conf). NOT tested here.
-- A hook that returns nothing passes the decision on to the next plugin (vmq_passwd, vmq_acl); false refuses.

-- The client id must be the account's username (Mosquitto's use_username_as_clientid, EMQX's alike): SLED's
-- services connect that way when their URL names an account, and no device can take over (and so disconnect)
-- a verifier's or another device's connection by reusing its client id.
function auth_on_register(reg)
    if reg.username == nil or reg.client_id ~= reg.username then
        return false
    end
end

-- No retained drafts: a retained draft would be delivered to every verifier subscribing, after every restart.
function auth_on_publish(pub)
    if pub.retain and string.sub(pub.topic, 1, 15) == "sled/v1/drafts/" then
        return false
    end
end

function auth_on_register_m5(reg)
    return auth_on_register(reg)
end

function auth_on_publish_m5(pub)
    return auth_on_publish(pub)
end

hooks = {
    auth_on_register = auth_on_register,
    auth_on_publish = auth_on_publish,
    auth_on_register_m5 = auth_on_register_m5,
    auth_on_publish_m5 = auth_on_publish_m5,
}
