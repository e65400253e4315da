"""counterwarp.report"""
