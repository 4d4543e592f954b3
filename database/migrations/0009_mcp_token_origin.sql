-- An agent's MCP bearer token is bound to the agent's own MCP server
-- (issue 10): the action-workers send it only to a server_url whose origin
-- (scheme, host, port; compared normalized: lowercase scheme and host,
-- default ports made explicit) is exactly server_origin. Any user may write
-- a trigger whose MCP action names any server, so without the binding the
-- token went wherever a trigger said. Rows from before this migration have
-- no origin: their token is sent nowhere until one is set, rather than
-- guessed from the triggers that an attacker may have written.
ALTER TABLE agent_mcp_tokens ADD COLUMN server_origin text
    CONSTRAINT agent_mcp_tokens_origin_form CHECK (server_origin ~* '^https?://[^/?#@[:space:]]+/?$');
COMMENT ON COLUMN agent_mcp_tokens.server_origin IS
    'scheme://host[:port] of the agent''s own MCP server; the token is sent to no other origin (NULL: to none)';
